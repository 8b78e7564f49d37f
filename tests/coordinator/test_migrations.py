"""The schema is managed by Alembic: migrations build exactly what the ORM declares."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator import migrations
from coordinator.core.db import make_engine
from coordinator.core.errors import NotFound
from coordinator.evaluations import service as evaluations
from coordinator.evaluations.models import EvaluationResult
from coordinator.leaderboard import comparisons
from coordinator.releases.models import Release

TABLES = {
    "alembic_version",
    "tokens",
    "base_models",
    "experts",
    "expert_versions",
    "expert_files",
    "file_segments",
    "releases",
    "release_experts",
    "evaluation_jobs",
    "evaluation_results",
    "blocks",
    "release_channels",
    "channel_history",
}


def test_upgrade_builds_every_table_on_an_empty_database(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        assert migrations.current_revision(engine) is None
        migrations.upgrade(engine)
        assert set(inspect(engine).get_table_names()) == TABLES
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_orm_models(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_upgrade_twice_is_a_no_op(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == migrations.head_revision()
    finally:
        engine.dispose()


def test_app_start_migrates_an_empty_database(make_app, settings, fresh_database_url):
    app = make_app(settings.model_copy(update={"database_url": fresh_database_url}))
    assert migrations.current_revision(app.state.engine) == migrations.head_revision()


def _fill_a_0001_database(engine) -> None:
    """Rows as 0001 stored them: a maintainer's yank, a contributor's yank, a release."""
    now = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as connection:
        run = connection.execute
        run(
            text(
                "INSERT INTO tokens (id, public_id, name, role, secret_sha256, created_at) VALUES "
                "(1, 'a1', 'alice', 'contributor', 'x', :now), "
                "(2, 'c1', 'carol', 'maintainer', 'x', :now)"
            ),
            {"now": now},
        )
        run(
            text(
                "INSERT INTO base_models (id, name, fingerprint, architecture, spec, created_at) "
                "VALUES (1, 'tiny', 'sha256:0', 'llama', '{}', :now)"
            ),
            {"now": now},
        )
        run(
            text(
                "INSERT INTO experts (id, namespace, name, created_at) "
                "VALUES (1, 'alice', 'demo', :now)"
            ),
            {"now": now},
        )
        for number, yanked_by in ((1, "carol"), (2, "alice"), (3, None)):
            run(
                text(
                    "INSERT INTO expert_versions (id, expert_id, number, base_model_id, "
                    "package_digest, manifest, rank, module_count, total_size, uploaded_by, "
                    "channel, created_at, yanked_at, yanked_by, yank_reason) VALUES (:n, 1, :n, "
                    "1, :digest, '{}', 4, 14, 100, 'alice', 'http', :now, :yanked_at, :by, :why)"
                ),
                {
                    "n": number,
                    "digest": f"sha256:{number}",
                    "now": now,
                    "yanked_at": now if yanked_by else None,
                    "by": yanked_by,
                    "why": "bad" if yanked_by else None,
                },
            )
        run(
            text(
                "INSERT INTO releases (id, number, method, base_model_id, notes, manifest, "
                "created_by, created_at) VALUES (1, 1, 'phatgoose', 1, '', '{}', 'carol', :now)"
            ),
            {"now": now},
        )
        run(
            text(
                "INSERT INTO release_experts (release_id, position, expert_version_id) "
                "VALUES (1, 0, 1)"
            )
        )


def test_0002_upgrades_a_0001_database_holding_data(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == migrations.head_revision()
        with engine.connect() as connection:
            roles = connection.execute(
                text(
                    "SELECT number, yanked_by, yanked_by_role FROM expert_versions ORDER BY number"
                )
            ).all()
            releases = connection.execute(
                text("SELECT number, withdrawn_at, withdrawn_by, withdrawn_reason FROM releases")
            ).all()
            blocks = connection.execute(text("SELECT count(*) FROM blocks")).scalar()
        # The maintainer's yank stays a maintainer's: its owner cannot lift it after upgrade.
        assert [tuple(r) for r in roles] == [
            (1, "carol", "maintainer"),
            (2, "alice", "contributor"),
            (3, None, None),
        ]
        assert [tuple(r) for r in releases] == [(1, None, None, None)]
        assert blocks == 0
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_0003_records_the_precision_of_results_scored_before_it_as_float32(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine, "0002")
        now = datetime(2026, 11, 2, tzinfo=UTC)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO evaluation_jobs (id, release_id, spec, state, attempts, "
                    "created_at) VALUES (1, 1, '{}', 'done', 1, :now)"
                ),
                {"now": now},
            )
            connection.execute(
                text(
                    "INSERT INTO evaluation_results (id, job_id, release_id, task, accuracy, "
                    "stderr, n, evaluator_version, created_at) "
                    "VALUES (1, 1, 1, 'parity', 0.5, 0.1, 20, 'v1', :now)"
                ),
                {"now": now},
            )
        migrations.upgrade(engine)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT task, precision FROM evaluation_results"))
            assert [tuple(r) for r in rows] == [("parity", "float32")]
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_0004_upgrades_a_0003_release_to_empty_method_params(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine, "0003")
        with engine.begin() as connection:  # a row that refers to the release
            connection.execute(
                text(
                    "INSERT INTO evaluation_jobs (id, release_id, spec, state, attempts, "
                    "created_at) VALUES (1, 1, '{}', 'done', 1, :now)"
                ),
                {"now": datetime(2026, 11, 3, tzinfo=UTC)},
            )
        assert "method_params" not in {c["name"] for c in inspect(engine).get_columns("releases")}
        migrations.upgrade(engine)
        column = next(
            c for c in inspect(engine).get_columns("releases") if c["name"] == "method_params"
        )
        assert column["nullable"] is False
        with Session(engine) as session:
            release = session.scalars(select(Release)).one()
            assert (release.number, release.method, release.method_params) == (1, "phatgoose", {})
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_0005_keeps_results_scored_before_it_without_outcomes(fresh_database_url):
    engine = make_engine(fresh_database_url)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine, "0004")
        now = datetime(2026, 11, 30, tzinfo=UTC)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO evaluation_jobs (id, release_id, spec, state, attempts, "
                    "created_at, finished_at) VALUES (1, 1, :spec, 'done', 1, :now, :now)"
                ),
                {"now": now, "spec": '{"tasks": ["parity"], "examples_per_task": 20}'},
            )
            connection.execute(
                text(
                    "INSERT INTO evaluation_results (id, job_id, release_id, task, accuracy, "
                    "stderr, n, evaluator_version, precision, created_at) "
                    "VALUES (1, 1, 1, 'parity', 0.5, 0.1, 20, 'v1', 'float32', :now)"
                ),
                {"now": now},
            )
        migrations.upgrade(engine)
        column = next(
            c for c in inspect(engine).get_columns("evaluation_results") if c["name"] == "outcomes"
        )
        assert column["nullable"] is True
        with Session(engine) as session:
            result = session.scalars(select(EvaluationResult)).one()
            assert (result.task, result.accuracy, result.n) == ("parity", 0.5, 20)
            assert (result.has_outcomes, result.outcomes) == (False, None)
            with pytest.raises(NotFound, match="no per-example outcomes"):
                evaluations.task_outcomes(session, 1, "parity")
            # A comparison with it works, and says why it has no difference.
            (task,) = comparisons.compare(session, 1, 1, groups={}).tasks
            assert (task.a, task.difference) == (0.5, None)
            assert task.reason is not None and "no per-example outcomes" in task.reason
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
    finally:
        engine.dispose()


def test_0006_lets_a_token_be_a_worker_and_keeps_who_uploaded_each_version(fresh_database_url):
    engine = make_engine(fresh_database_url)
    worker_token = text(
        "INSERT INTO tokens (id, public_id, name, role, secret_sha256, created_at) "
        "VALUES (:id, :public_id, 'gpu', :role, 'x', :now)"
    )
    now = datetime(2026, 12, 1, tzinfo=UTC)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine, "0005")
        with engine.begin() as connection:  # versions refer to the tokens that uploaded them
            connection.execute(
                text(
                    "UPDATE expert_versions SET uploader_token_id = "
                    "CASE WHEN number = 2 THEN 2 ELSE 1 END"
                )
            )
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                worker_token, {"id": 3, "public_id": "w0", "role": "worker", "now": now}
            )

        migrations.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(
                worker_token, {"id": 3, "public_id": "w1", "role": "worker", "now": now}
            )
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(
                worker_token, {"id": 4, "public_id": "w2", "role": "robot", "now": now}
            )
        with engine.connect() as connection:
            uploaders = connection.execute(
                text("SELECT number, uploader_token_id FROM expert_versions ORDER BY number")
            ).all()
            tokens = connection.execute(text("SELECT id, name, role FROM tokens ORDER BY id")).all()
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
        # SQLite rebuilds the table: its ON DELETE SET NULL must not have forgotten uploaders.
        assert [tuple(r) for r in uploaders] == [(1, 1), (2, 2), (3, 1)]
        assert [tuple(r) for r in tokens] == [
            (1, "alice", "contributor"),
            (2, "carol", "maintainer"),
            (3, "gpu", "worker"),
        ]
        assert "ix_tokens_name" in {i["name"] for i in inspect(engine).get_indexes("tokens")}
    finally:
        engine.dispose()


def test_0007_refuses_to_downgrade_while_files_are_stored_in_pieces(fresh_database_url):
    from alembic import command

    engine = make_engine(fresh_database_url)
    piece = text(
        "INSERT INTO file_segments (file_sha256, position, segment_sha256, size) "
        "VALUES (:file, 0, :piece, 3)"
    )
    try:
        migrations.upgrade(engine, "0007")
        with engine.begin() as connection:
            connection.execute(piece, {"file": "a" * 64, "piece": "b" * 64})
        with pytest.raises(RuntimeError, match="split-blobs --join"), engine.begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0006")
        assert migrations.current_revision(engine) == "0007"
        with engine.begin() as connection:  # once joined, the table can go
            connection.execute(text("DELETE FROM file_segments"))
        with engine.begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0006")
        assert migrations.current_revision(engine) == "0006"
        assert "file_segments" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_0008_adds_release_channels_to_a_database_holding_data_and_drops_them_on_downgrade(
    fresh_database_url,
):
    from alembic import command

    engine = make_engine(fresh_database_url)
    channel = text(
        "INSERT INTO release_channels (id, namespace, name, method, method_params, "
        "base_model_id, follow, paused, release_id, sequence, notes, created_by, created_at, "
        "updated_at) VALUES (1, 'community', 'latest', 'phatgoose', '{}', 1, true, false, 1, 1, "
        "'', 'carol', :now, :now)"
    )
    entry = text(
        "INSERT INTO channel_history (channel_id, sequence, release_id, action, reason, "
        "created_by, created_at) VALUES (1, :sequence, 1, :action, 'x', 'carol', :now)"
    )
    now = datetime(2026, 12, 2, tzinfo=UTC)
    try:
        migrations.upgrade(engine, "0001")
        _fill_a_0001_database(engine)
        migrations.upgrade(engine, "0007")
        migrations.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(channel, {"now": now})
            connection.execute(entry, {"sequence": 1, "action": "advance", "now": now})
        # (channel, sequence) is the key; an action outside the four is refused.
        for sequence, action in ((1, "advance"), (2, "teleport")):
            with pytest.raises(IntegrityError), engine.begin() as connection:
                connection.execute(entry, {"sequence": sequence, "action": action, "now": now})
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, migrations.target_metadata()) == []
        with engine.begin() as connection:
            command.downgrade(migrations.alembic_config(connection), "0007")
        tables = set(inspect(engine).get_table_names())
        assert not tables & {"release_channels", "channel_history"}
        assert "releases" in tables
    finally:
        engine.dispose()
