"""`phatgoose coordinator ...`: run the service and manage tokens and base models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from coordinator.auth.models import Role
from protocol.methods import METHODS
from protocol.precision import Precision

app = typer.Typer(
    help="Run the coordinator service and manage its catalog.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Data directory (SQLite file, blobs). Default: $PHATGOOSE_DATA_DIR or "
        "./.phatgoose/coordinator.",
        show_default=False,
    ),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. Default: "
        "$PHATGOOSE_DATABASE_URL, else a SQLite file in the data directory.",
        show_default=False,
    ),
]


def _release_number(text: str) -> int:
    """A release number in ASCII digits: click's int() reads '١' as 1 and '²' fails late."""
    from coordinator.experts.service import MAX_VERSION_NUMBER, parse_version_number

    number = parse_version_number(text)
    if number is None:
        raise typer.BadParameter(f"{text!r} is not 1 to {MAX_VERSION_NUMBER} in ASCII digits")
    return number


ReleaseNumber = Annotated[
    int, typer.Argument(help="The release number.", parser=_release_number, metavar="NUMBER")
]


def _settings(data_dir: Path | None, database_url: str | None) -> Any:
    from coordinator.core.config import Settings

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url is not None:
        overrides["database_url"] = database_url
    return Settings(**overrides)


def _sessions(data_dir: Path | None, database_url: str | None) -> Any:
    from coordinator.core.app import open_database

    _engine, sessions = open_database(_settings(data_dir, database_url))
    return sessions


def _blob_store(settings: Any) -> Any:
    """The configured blob store (PHATGOOSE_BLOB_URL, else the data directory's folder); one
    that cannot be used ends the command with the reason, not a traceback."""
    from coordinator.storage import BlobStoreError, open_blob_store

    try:
        return open_blob_store(settings)
    except BlobStoreError as error:
        typer.secho(str(error), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from error


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (8000 is Flower's).")] = 8765,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Start the coordinator API (docs at /docs).

    Migrates the database and checks storage first. Needs no set-up: a SQLite file and the
    blobs go into the data directory.
    """
    import uvicorn

    from coordinator.core.app import create_app
    from coordinator.storage import BlobStoreError

    settings = _settings(data_dir, database_url)
    try:
        application = create_app(settings)
    except BlobStoreError as error:
        typer.secho(str(error), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from error
    report = application.state.startup_report
    if report.missing_blobs:
        typer.secho(
            f"warning: {len(report.missing_blobs)} catalog file(s) have no blob; "
            "see `phatgoose coordinator check`",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"coordinator on http://{host}:{port} (API docs: http://{host}:{port}/docs)")
    uvicorn.run(application, host=host, port=port, log_config=None, access_log=False)


@app.command()
def migrate(data_dir: DataDirOption = None, database_url: DatabaseOption = None) -> None:
    """Bring the database to the newest schema (start-up does this too)."""
    from coordinator import migrations
    from coordinator.core.db import make_engine

    settings = _settings(data_dir, database_url)
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url)
    before = migrations.current_revision(engine)
    migrations.upgrade(engine)
    after = migrations.current_revision(engine)
    typer.echo(f"database at revision {after} (was {before or 'empty'})")


@app.command("create-token")
def create_token(
    name: Annotated[
        str,
        typer.Option(
            help="The holder's namespace: experts publish as NAME/<expert>. A worker token's "
            "NAME is only a label (it owns no namespace)."
        ),
    ],
    role: Annotated[
        Role,
        typer.Option(
            help="contributor: publish under NAME; maintainer: all; worker: lease and report "
            "evaluation jobs, read and download, nothing else (a remote `worker --url`)."
        ),
    ],
    same_owner: Annotated[
        bool,
        typer.Option(
            "--same-owner",
            help="NAME already has an owner and this token is for that same holder (e.g. "
            "rotating a token); without it such a contributor token is refused.",
        ),
    ] = False,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Create a bearer token and print it once (only its hash is stored)."""
    from coordinator.auth.service import InvalidTokenName, NamespaceTaken
    from coordinator.auth.service import create_token as create

    settings = _settings(data_dir, database_url)
    with _sessions(data_dir, database_url)() as session:
        try:
            issued = create(
                session,
                name=name,
                role=role,
                prefix=settings.token_prefix,
                same_owner=same_owner,
            )
        except (InvalidTokenName, NamespaceTaken) as error:
            raise typer.BadParameter(str(error), param_hint="--name") from error
    typer.secho(
        f"token for {name} ({role.value}, id {issued.token.public_id}); shown once:",
        err=True,
    )
    typer.echo(issued.secret_token)


@app.command("list-tokens")
def list_tokens(data_dir: DataDirOption = None, database_url: DatabaseOption = None) -> None:
    """Tokens by id, name, role and state (secrets are never shown again)."""
    from coordinator.auth.service import list_tokens as list_all

    with _sessions(data_dir, database_url)() as session:
        for token in list_all(session):
            state = f"revoked {token.revoked_at:%Y-%m-%d}" if token.revoked_at else "active"
            typer.echo(f"{token.public_id}  {token.name:<24} {token.role:<12} {state}")


@app.command("revoke-token")
def revoke_token(
    token_id: Annotated[str, typer.Argument(help="The token's id (see list-tokens).")],
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Revoke a token: it stops working at once; what it published stays."""
    from coordinator.auth.service import revoke_token as revoke

    with _sessions(data_dir, database_url)() as session:
        token = revoke(session, token_id)
    if token is None:
        typer.secho(f"no token with id {token_id}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    typer.echo(f"revoked {token.public_id} ({token.name})")


@app.command("register-base")
def register_base(
    name_or_path: Annotated[
        str, typer.Argument(help="smollm2-135m (bundled), a local path or a Hugging Face name.")
    ] = "smollm2-135m",
    name: Annotated[
        str | None, typer.Option(help="Name experts use in their manifest (default: as given).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Revision to record.")] = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Record a base model: identity, fingerprint and linear modules.

    Loads the model through phatgoose.models; uploads are validated against what is recorded.
    """
    from coordinator.base_models.service import BaseModelConflict, register_base_model_from_path

    with _sessions(data_dir, database_url)() as session:
        try:
            record = register_base_model_from_path(
                session, name_or_path, name=name, revision=revision
            )
        except BaseModelConflict as error:
            typer.secho(str(error), err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
        modules = len(record.spec["linear_modules"])
        typer.echo(f"base model {record.name}: {record.fingerprint}, {modules} linear modules")


@app.command()
def check(data_dir: DataDirOption = None, database_url: DatabaseOption = None) -> None:
    """Run the start-up checks: remove stale temp files (and unfinished multipart uploads in
    object storage) and blobs no catalog file needs that are older than
    PHATGOOSE_STALE_TEMP_SECONDS; list catalog files whose blobs are missing."""
    from coordinator.core.startup import run_startup_checks

    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    blobs = _blob_store(settings)
    with sessions() as session:
        report = run_startup_checks(session, blobs, settings)
    typer.echo(f"checked the blob store {report.blob_store}")
    typer.echo(
        f"removed {len(report.removed_temp_files)} stale temp file(s) or unfinished upload(s)"
    )
    typer.echo(f"removed {len(report.removed_blobs)} blob(s) no catalog file needs")
    for missing in report.missing_blobs:
        typer.echo(f"MISSING {missing.describe()}")
    if report.missing_blobs:
        raise typer.Exit(1)
    typer.echo("every catalog file has its blob")


@app.command()
def worker(
    once: Annotated[
        bool, typer.Option("--once", help="Exit when no job is left to claim.")
    ] = False,
    poll_seconds: Annotated[
        float, typer.Option(help="Wait between looks at an empty queue.", min=0.01)
    ] = 5.0,
    lease_seconds: Annotated[
        float,
        typer.Option(
            help="A job is taken over when its worker misses heartbeats this long.", min=0.1
        ),
    ] = 120.0,
    max_attempts: Annotated[
        int, typer.Option(help="Attempts before a job is marked failed.", min=1)
    ] = 3,
    worker_id: Annotated[
        str | None,
        typer.Option(
            help="Name in the job rows (default worker-<pid>-<random>; a remote worker's is "
            "recorded under its token's name, <token>/<id>)."
        ),
    ] = None,
    tasks_dir: Annotated[
        Path | None,
        typer.Option(
            help="BIG-bench tasks (<dir>/<task>/task.json); default $PHATGOOSE_TASKS_DIR "
            "or the fetched bigbench task files."
        ),
    ] = None,
    base_model: Annotated[
        list[str] | None,
        typer.Option(
            "--base-model",
            help="NAME=PATH: load the registered base model NAME from PATH (repeatable); "
            "other names are loaded by name.",
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="Compute precision of scoring: auto (bfloat16 where this machine multiplies "
            "it natively), float32 or bfloat16; each result records the one used."
        ),
    ] = "auto",
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="Remote mode: the coordinator's base URL (https://coordinator.example); jobs "
            "are leased over its API with a worker token. Without it, the local worker runs on "
            "the coordinator's own database and blobs.",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="Remote mode: a file holding the worker token, else $PHATGOOSE_WORKER_TOKEN "
            "(never the token itself on the command line: other users can read it there).",
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Remote mode: the verified cache of downloaded release files. Default: "
            "<phatgoose cache>/worker ($PHATGOOSE_CACHE, or ~/.cache/phatgoose).",
            show_default=False,
        ),
    ] = None,
    task_delay_seconds: Annotated[float, typer.Option(hidden=True)] = 0.0,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Run evaluation jobs: claim one, score its release on each task, store the results.

    Local (default): on the coordinator's own database and blobs (--data-dir,
    --database-url). Remote (--url): on any machine, with only the coordinator's URL and a
    worker token (create-token --role worker) from --token-file or $PHATGOOSE_WORKER_TOKEN;
    jobs are leased over the job API and release files kept in a verified cache
    (--cache-dir).
    """
    from coordinator.core.logging import configure_logging
    from coordinator.storage import BlobStoreError
    from coordinator.worker import WorkerOptions, default_worker_id, run_worker

    settings = _settings(data_dir, database_url)
    configure_logging(settings.log_level)
    paths: dict[str, str] = {}
    for item in base_model or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--base-model")
        paths[name] = path
    options = WorkerOptions(
        worker_id=worker_id or default_worker_id(),
        lease_seconds=lease_seconds,
        poll_seconds=poll_seconds,
        max_attempts=max_attempts,
        tasks_dir=tasks_dir or settings.tasks_dir,
        base_models=paths,
        precision=precision,
        task_delay_seconds=task_delay_seconds,
    )
    typer.echo(f"worker {options.worker_id}", err=True)
    if url is not None:
        if data_dir is not None or database_url is not None:
            raise typer.BadParameter(
                "a remote worker (--url) has no database: drop --data-dir and --database-url",
                param_hint="--url",
            )
        ended = _run_remote_worker(url, token_file, cache_dir, options, once=once)
        typer.echo(f"{ended} job(s) ended", err=True)
        return
    if token_file is not None or cache_dir is not None:
        raise typer.BadParameter(
            "--token-file and --cache-dir are for a remote worker: add --url", param_hint="--url"
        )
    try:
        ended = run_worker(settings, options, once=once)
    except BlobStoreError as error:  # e.g. PHATGOOSE_BLOB_URL names a bucket it cannot read
        typer.secho(str(error), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from error
    typer.echo(f"{ended} job(s) ended", err=True)


def _run_remote_worker(
    url: str, token_file: Path | None, cache_dir: Path | None, options: Any, *, once: bool
) -> int:
    """`worker --url`: the token from its file or the environment, then the remote loop;
    a refused token or an unreachable coordinator ends it with the reason, exit status 1."""
    import os

    from coordinator.core.config import warn_if_readable_by_others
    from coordinator.worker import CoordinatorUnavailable, WorkerStopped, run_remote_worker
    from coordinator.worker_http import CoordinatorRefused, WorkerSetupError
    from phatgoose.models import cache_root

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise typer.BadParameter(
                f"cannot read {token_file}: {error}", param_hint="--token-file"
            ) from None
        warn_if_readable_by_others(token_file)
    else:
        token = os.environ.get(WORKER_TOKEN_ENV, "").strip()
    if not token:
        raise typer.BadParameter(
            f"a remote worker needs its token: --token-file PATH or ${WORKER_TOKEN_ENV}",
            param_hint="--token-file",
        )
    try:
        return run_remote_worker(
            url, token, cache_dir or cache_root() / "worker", options, once=once
        )
    except WorkerSetupError as error:  # the URL, the token's form, an option out of range
        raise typer.BadParameter(str(error), param_hint="--url") from None
    except (WorkerStopped, CoordinatorUnavailable, CoordinatorRefused) as error:
        typer.secho(f"worker stopped: {error}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


# The environment variable a remote worker reads its token from (not argv: others see it).
WORKER_TOKEN_ENV = "PHATGOOSE_WORKER_TOKEN"


def parse_param(item: str) -> tuple[str, int | float | str]:
    """`name=value`, the value an int, else a float, else the string (both stripped)."""
    name, sep, text = (part.strip() for part in item.partition("="))
    if not sep or not name or not text:
        raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--param")
    for kind in (int, float):
        try:
            return name, kind(text)
        except ValueError:
            pass
    return name, text


def _params_help() -> str:
    from coordinator.releases.schemas import params_help

    return (
        "NAME=VALUE: a hyper-parameter of the method (repeatable; the value is read as an "
        "integer, else a number, else a string; those not given take their defaults). "
        + params_help()
        + "."
    )


@app.command(
    "create-release",
    help="Create a release, as the API's POST /releases does (recorded as by 'operator'). "
    f"METHOD: one of {', '.join(METHODS)}. EXPERTS: namespace/name@version, or "
    "namespace/name for its newest version that is not yanked (none for base).",
)
def create_release(
    method: Annotated[str, typer.Argument(help="The routing method.")],
    experts: Annotated[
        list[str] | None, typer.Argument(help="The experts.", show_default=False)
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="Experts per token or per example (the methods that select top-k; default "
            "min(2, experts)).",
            min=1,
        ),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help=_params_help(), show_default=False)
    ] = None,
    expert: Annotated[
        str | None, typer.Option(help="Method single: the expert used.", show_default=False)
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="The base model (required for base when several are registered)."),
    ] = None,
    allow_yanked: Annotated[
        bool, typer.Option("--allow-yanked", help="Accept exact versions that are yanked.")
    ] = False,
    notes: Annotated[str, typer.Option(help="Shown with the release.")] = "",
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    from pydantic import ValidationError

    from coordinator.core.errors import CoordinatorError
    from coordinator.releases import service
    from coordinator.releases.schemas import ReleaseCreate, method_label

    params: dict[str, int | float | str] = {}
    for item in param or []:
        name, value = parse_param(item)
        if name in params:
            raise typer.BadParameter(f"{name} is given twice", param_hint="--param")
        params[name] = value
    try:
        request = ReleaseCreate.model_validate(
            {
                "method": method,
                "experts": experts or [],
                "top_k": top_k,
                "params": params or None,
                "expert": expert,
                "base_model": base_model,
                "allow_yanked": allow_yanked,
                "notes": notes,
            }
        )
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(f"{where}: {problem['msg']}") from None
    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    blobs = _blob_store(settings)
    with sessions() as session:
        try:
            release = service.create_release(session, blobs, request, by="operator")
        except CoordinatorError as error:
            expected = f" (expected {error.expected})" if error.expected else ""
            typer.secho(f"{error.check}: {error.message}{expected}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
        label = method_label(release.method, release.top_k, release.method_params)
        count = len(release.manifest["experts"])
        privacy = service.release_privacy(session, [release.id])[release.id]
    typer.echo(f"release {release.number}: {label} over {count} expert(s)")
    typer.echo(f"privacy: {privacy.summary()}")


@app.command(
    "credit",
    help="Queue each expert's leave-one-out evaluation of release NUMBER, and the full one, "
    "on a spec, as the API's POST /releases/{n}/credit does (recorded as by 'operator'); "
    "jobs already queued, running or done on that spec are not queued again. N experts: up "
    "to N + 1 evaluations.",
)
def credit(
    number: ReleaseNumber,
    tasks: Annotated[
        list[str], typer.Option("--tasks", help="A task name (repeat for each task).")
    ],
    examples_per_task: Annotated[int, typer.Option(help="Examples scored per task.", min=1)],
    seed: Annotated[int, typer.Option(help="The split's seed.")] = 0,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    from pydantic import ValidationError

    from coordinator.core.errors import CoordinatorError
    from coordinator.credit import service
    from coordinator.credit.schemas import CreditCreate
    from coordinator.evaluations.task_names import check_requested_tasks

    try:
        request = CreditCreate.model_validate(
            {"tasks": tasks, "examples_per_task": examples_per_task, "seed": seed}
        )
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(f"{where}: {problem['msg']}") from None
    settings = _settings(data_dir, database_url)
    with _sessions(data_dir, database_url)() as session:
        try:
            check_requested_tasks(request, settings.tasks_dir)
            queued = service.queue_credit(session, number, request, by="operator")
        except CoordinatorError as error:
            expected = f" (expected {error.expected})" if error.expected else ""
            typer.secho(f"{error.check}: {error.message}{expected}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
    typer.echo(
        f"release {number}: full evaluation {queued.full_job}, leave-one-out evaluations "
        + ", ".join(f"{ref} {job}" for ref, job in queued.leave_out_jobs.items())
        + f"; queued now: {', '.join(map(str, queued.queued)) or 'none'}"
    )


# --- release channels ----------------------------------------------------------------------

channel_app = typer.Typer(
    help="Release channels: named, moving pointers to releases that follow the catalog "
    "(docs/coordinator.md, 'Release channels'). Changes are recorded as by 'operator'.",
    no_args_is_help=True,
)
app.add_typer(channel_app, name="channel")

ChannelName = Annotated[str, typer.Argument(help="The channel: namespace/name.", metavar="NAME")]
ReasonOption = Annotated[str, typer.Option(help="Why, kept in its history.")]


def _refused(error: Any) -> typer.Exit:
    """Print a service's refusal (a `CoordinatorError`) as the API words it; exit 1."""
    expected = f" (expected {error.expected})" if error.expected else ""
    typer.secho(f"{error.check}: {error.message}{expected}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@contextmanager
def _on_channel(
    full_name: str, data_dir: Path | None, database_url: str | None
) -> Iterator[tuple[Any, Any]]:
    """(session, channel) for a command on the channel `full_name`; a refusal of the service
    (a `CoordinatorError`: no such channel, a move it cannot make) exits as `_refused`."""
    from coordinator.channels import service
    from coordinator.core.errors import CoordinatorError

    namespace, _, name = full_name.partition("/")
    with _sessions(data_dir, database_url)() as session:
        try:
            yield session, service.get_channel(session, namespace, name)
        except CoordinatorError as error:
            raise _refused(error) from error


def _channel_line(channel: Any) -> str:
    from coordinator.channels import service
    from coordinator.releases.schemas import method_label

    release = f"#{channel.release.number}" if channel.release else "none"
    label = method_label(channel.method, channel.top_k, channel.method_params)
    return f"{channel.full_name:<32} release {release:<6} {service.state(channel):<18} {label}"


@channel_app.command("create")
def channel_create(
    name: ChannelName,
    method: Annotated[str, typer.Option(help=f"The routing method: {', '.join(METHODS)}.")],
    expert: Annotated[
        list[str] | None,
        typer.Option(
            "--expert",
            help="namespace/name, each at its newest version that is not yanked (repeat). "
            "Without it: every admitted expert of the base model (see --namespace, --glob).",
            show_default=False,
        ),
    ] = None,
    namespace: Annotated[
        list[str] | None,
        typer.Option(
            "--namespace", help="Only experts of this namespace (repeat).", show_default=False
        ),
    ] = None,
    glob: Annotated[
        str | None,
        typer.Option("--glob", help="Only experts whose namespace/name matches this glob."),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="Experts per token or example (capped at the experts there are).", min=1),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help=_params_help(), show_default=False)
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="The base model (default: the only one registered).")
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="A task its releases are evaluated on (repeat; none: no evaluation).",
            show_default=False,
        ),
    ] = None,
    examples_per_task: Annotated[
        int | None, typer.Option(help="Examples scored per task (with --tasks).", min=1)
    ] = None,
    seed: Annotated[int, typer.Option(help="The split's seed.")] = 0,
    held_in: Annotated[
        list[str] | None,
        typer.Option("--held-in", help="A task held in (repeat).", show_default=False),
    ] = None,
    held_out: Annotated[
        list[str] | None,
        typer.Option("--held-out", help="A task held out (repeat).", show_default=False),
    ] = None,
    manual: Annotated[
        bool,
        typer.Option("--manual", help="Do not follow the catalog: only pins move it."),
    ] = False,
    notes: Annotated[str, typer.Option(help="Shown with the channel.")] = "",
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Create a release channel, as the API's POST /channels does.

    It points at no release until it first advances (`channel advance`, or any worker's
    poll)."""
    from pydantic import ValidationError

    from coordinator.channels import service
    from coordinator.channels.schemas import ChannelCreate
    from coordinator.core.errors import CoordinatorError
    from coordinator.evaluations.task_names import check_requested_tasks

    params: dict[str, int | float | str] = {}
    for item in param or []:
        key, value = parse_param(item)
        if key in params:
            raise typer.BadParameter(f"{key} is given twice", param_hint="--param")
        params[key] = value
    spec = None
    if tasks:
        if examples_per_task is None:
            raise typer.BadParameter("--tasks needs --examples-per-task", param_hint="--tasks")
        groups = {"held_in": held_in or [], "held_out": held_out or []}
        spec = {
            "tasks": tasks,
            "examples_per_task": examples_per_task,
            "seed": seed,
            "task_groups": groups if held_in or held_out else None,
        }
    try:
        request = ChannelCreate.model_validate(
            {
                "name": name,
                "method": method,
                "experts": expert or None,
                "namespaces": namespace or None,
                "name_glob": glob,
                "top_k": top_k,
                "params": params or None,
                "base_model": base_model,
                "spec": spec,
                "follow": not manual,
                "notes": notes,
            }
        )
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise typer.BadParameter(f"{where}: {problem['msg']}") from None
    settings = _settings(data_dir, database_url)
    with _sessions(data_dir, database_url)() as session:
        try:
            if request.spec is not None:
                check_requested_tasks(request.spec, settings.tasks_dir)
            channel = service.create_channel(session, request, by="operator")
        except CoordinatorError as error:
            raise _refused(error) from error
        line = _channel_line(channel)
    typer.echo(f"created {line}")


@channel_app.command("list")
def channel_list(data_dir: DataDirOption = None, database_url: DatabaseOption = None) -> None:
    """Every channel: the release it points at, its state and recipe."""
    from coordinator.channels import service

    with _sessions(data_dir, database_url)() as session:
        page = service.channel_page(session, limit=10_000, offset=0)
        for channel in page.items:
            typer.echo(_channel_line(channel))


@channel_app.command("show")
def channel_show(
    name: ChannelName,
    moves: Annotated[int, typer.Option(help="History entries shown, newest first.", min=1)] = 10,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """A channel: its release, state, recipe and newest history entries.

    The release's API URL is printed too: phatgoose.load_release takes it."""
    from coordinator.channels import service
    from coordinator.releases.schemas import release_url

    with _on_channel(name, data_dir, database_url) as (session, channel):
        typer.echo(_channel_line(channel))
        if channel.release is not None:
            typer.echo(f"release URL: {release_url(channel.release.number)}")
        if channel.advance_error:
            typer.echo(f"cannot advance: {channel.advance_error}")
        for entry, number in service.history_page(session, channel, limit=moves).items:
            typer.echo(
                f"{entry.sequence:>4} {entry.created_at:%Y-%m-%d %H:%M} #{number:<5} "
                f"{entry.action:<8} {entry.reason} ({entry.created_by})"
            )


@channel_app.command("pin")
def channel_pin(
    name: ChannelName,
    number: ReleaseNumber,
    reason: ReasonOption = "",
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Point the channel at release NUMBER and hold it there until unpinned."""
    from coordinator.channels import service

    with _on_channel(name, data_dir, database_url) as (session, channel):
        entry = service.pin(session, channel, number, by="operator", reason=reason)
    typer.echo(f"{name}: pinned to release {number} (move {entry.sequence})")


@channel_app.command("unpin")
def channel_unpin(
    name: ChannelName, data_dir: DataDirOption = None, database_url: DatabaseOption = None
) -> None:
    """Let a pinned channel follow the catalog again (from its next advance)."""
    from coordinator.channels import service

    with _on_channel(name, data_dir, database_url) as (session, channel):
        entry = service.unpin(session, channel, by="operator")
    typer.echo(f"{name}: unpinned (move {entry.sequence})")


@channel_app.command("rollback")
def channel_rollback(
    name: ChannelName,
    reason: ReasonOption = "",
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Point the channel back at its previous release, pinned there (unpin to follow again)."""
    from coordinator.channels import service

    with _on_channel(name, data_dir, database_url) as (session, channel):
        entry = service.rollback(session, channel, by="operator", reason=reason)
        number = channel.release.number
    typer.echo(f"{name}: rolled back to release {number}, pinned (move {entry.sequence})")


@channel_app.command("pause")
def channel_pause(
    name: ChannelName,
    reason: ReasonOption = "",
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Hold the channel where it is until resumed."""
    from coordinator.channels import service

    with _on_channel(name, data_dir, database_url) as (session, channel):
        service.pause(session, channel, by="operator", reason=reason)
    typer.echo(f"{name}: paused")


@channel_app.command("resume")
def channel_resume(
    name: ChannelName, data_dir: DataDirOption = None, database_url: DatabaseOption = None
) -> None:
    """Let a paused channel advance again."""
    from coordinator.channels import service

    with _on_channel(name, data_dir, database_url) as (session, channel):
        service.resume(session, channel, by="operator")
    typer.echo(f"{name}: resumed")


@channel_app.command("advance")
def channel_advance(data_dir: DataDirOption = None, database_url: DatabaseOption = None) -> None:
    """Advance every channel that follows the catalog now (workers do it each poll).

    A release per catalog change, and its evaluation queued. Exit 1 if a channel cannot."""
    from coordinator.channels import service

    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    blobs = _blob_store(settings)
    with sessions() as session:
        report = service.advance_channels(session, blobs, settings)
    for moved in report.advanced:
        job = f", evaluation {moved.job_id}" if moved.job_id else ""
        typer.echo(f"{moved.channel}: release {moved.release}{job} ({moved.reason})")
    for name in report.unchanged:
        typer.echo(f"{name}: unchanged")
    for name in report.held:
        typer.echo(f"{name}: held (paused, pinned or manual)")
    for name, error in report.errors.items():
        typer.secho(f"{name}: cannot advance: {error}", err=True, fg=typer.colors.RED)
    if report.errors:
        raise typer.Exit(1)


@app.command("withdraw-release")
def withdraw_release(
    number: ReleaseNumber,
    reason: Annotated[str, typer.Option(help="Why, shown with the release.")],
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Withdraw a release: it stays readable, shows as withdrawn, and new evaluations of it
    are refused (unless a maintainer overrides)."""
    from coordinator.core.errors import CoordinatorError
    from coordinator.releases import service

    with _sessions(data_dir, database_url)() as session:
        try:
            release = service.withdraw_release(
                session, service.get_release(session, number), by_name="operator", reason=reason
            )
        except CoordinatorError as error:
            typer.secho(error.message, err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
    typer.echo(f"withdrew release {release.number}: {reason}")


@app.command("restore-release")
def restore_release(
    number: ReleaseNumber,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Undo a withdrawal."""
    from coordinator.core.errors import CoordinatorError
    from coordinator.releases import service

    with _sessions(data_dir, database_url)() as session:
        try:
            release = service.restore_release(
                session, service.get_release(session, number), by_name="operator"
            )
        except CoordinatorError as error:
            typer.secho(error.message, err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
    typer.echo(f"restored release {release.number}")


@app.command("export-release")
def export_release(
    number: ReleaseNumber,
    directory: Annotated[Path, typer.Argument(help="Where to write release.json and the experts.")],
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Write a release as a directory that phatgoose.load_release(DIRECTORY) loads."""
    from coordinator.core.errors import NotFound
    from coordinator.releases.service import export_release as export
    from coordinator.releases.service import get_release

    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    blobs = _blob_store(settings)
    with sessions() as session:
        try:
            release = get_release(session, number)
        except NotFound as error:
            typer.secho(error.message, err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from error
        export(session, blobs, release, directory)
    experts = len(release.manifest["experts"])
    typer.echo(f"release {number} ({release.method}, {experts} experts) written to {directory}")


@app.command("split-blobs")
def split_blobs(
    join: Annotated[
        bool,
        typer.Option(
            "--join",
            help="The other way: store every file whole again (before downgrading the "
            "database below migration 0007).",
        ),
    ] = False,
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Store the catalog's safetensors files in pieces, one blob per tensor, so that
    versions sharing tensors store them once (new uploads are stored so already; files
    uploaded before are stored whole until this runs). Safe to run while the coordinator
    serves, and again: each file's pieces are verified and committed before its whole blob
    goes. Then reports what `check` reports."""
    from tqdm.auto import tqdm

    from coordinator.core.startup import run_startup_checks
    from coordinator.experts.files import join_split_files, split_whole_files
    from coordinator.experts.upload import upload_folder

    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    blobs = _blob_store(settings)
    with sessions() as session, upload_folder(settings.upload_tmp_dir) as scratch:
        with tqdm(desc="join" if join else "split", unit="file") as bar:
            changed = (join_split_files if join else split_whole_files)(
                session, blobs, scratch, bar.update
            )
        report = run_startup_checks(session, blobs, settings)
    how = "stored whole again" if join else "stored in pieces"
    typer.echo(f"{len(changed)} file(s) {how}; {len(report.removed_blobs)} blob(s) removed")
    for missing in report.missing_blobs:
        typer.echo(f"MISSING {missing.describe()}")
    if report.missing_blobs:
        raise typer.Exit(1)


@app.command("copy-blobs")
def copy_blobs(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="Destination: s3://bucket/prefix (endpoint and credentials from the AWS "
            "environment), or a local folder used as the blob folder (as <data dir>/blobs).",
            show_default=False,
        ),
    ],
    data_dir: DataDirOption = None,
    database_url: DatabaseOption = None,
) -> None:
    """Copy every blob of the configured store (PHATGOOSE_BLOB_URL, else <data dir>/blobs)
    that the destination lacks, then read back every catalog file's blob from the
    destination and check its sha256.

    Exits 1 naming any blob missing or corrupt. Once it passes, point PHATGOOSE_BLOB_URL at
    the destination and restart the coordinator.
    """
    from tqdm.auto import tqdm

    from coordinator.core.startup import catalog_files
    from coordinator.experts.files import StoredFile, stored_files, verify_files
    from coordinator.storage import BlobStoreError
    from coordinator.storage.copy import copy_blobs as copy
    from coordinator.storage.copy import open_destination
    from coordinator.storage.urls import is_s3_url

    settings = _settings(data_dir, database_url)
    sessions = _sessions(data_dir, database_url)
    source = _blob_store(settings)
    try:
        destination = open_destination(to)
    except (BlobStoreError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--to") from error
    if destination.location == source.location:
        raise typer.BadParameter(
            f"{to} is the configured blob store itself ({source.location})", param_hint="--to"
        )
    files: dict[StoredFile, list[str]] = {}  # where the bytes are -> the catalog files
    with sessions() as session:
        catalog = list(catalog_files(session))
        stored = stored_files(session, ((file.sha256, file.size) for file in catalog))
        for file in catalog:
            files.setdefault(stored[file.sha256], []).append(f"{file.ref} {file.filename}")
    try:
        digests = list(source.iter_blobs())
        with tqdm(total=len(digests), desc="copy", unit="blob") as bar:
            copied = copy(source, destination, digests, settings.upload_tmp_dir, bar.update)
        # Read back from the destination: the copy step's word is not taken for it.
        with tqdm(total=len(files), desc="verify", unit="blob") as bar:
            verified, problems = verify_files(destination, files, bar.update)
    except BlobStoreError as error:
        typer.secho(str(error), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from error
    typer.echo(
        f"copied {copied.copied}, already there {copied.already_there}, verified "
        f"{verified} of {len(files)} catalog file(s) in {destination.location}"
    )
    for problem in copied.problems + problems:
        typer.secho(problem, err=True, fg=typer.colors.RED)
    if copied.problems or problems:
        raise typer.Exit(1)
    if is_s3_url(to):
        typer.echo(f"to use it: PHATGOOSE_BLOB_URL={destination.location}")
    else:
        typer.echo("to use it: unset PHATGOOSE_BLOB_URL, with this folder as <data dir>/blobs")
