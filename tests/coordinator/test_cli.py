"""`phatgoose coordinator ...` commands."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from coordinator import migrations
from coordinator.auth.service import authenticate
from coordinator.base_models.service import get_by_name
from coordinator.cli import app as cli
from coordinator.cli import parse_param
from coordinator.core.app import open_database
from coordinator.releases.service import get_release, list_releases
from protocol import METHOD_SPECS
from tests.coordinator.release_helpers import publish
from tests.tiny import tiny_tokenizer

runner = CliRunner()


@pytest.fixture
def cli_args(settings) -> list[str]:
    return ["--data-dir", str(settings.data_dir), "--database-url", settings.database_url]


def test_help_explains_every_command():
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "migrate", "create-token", "register-base", "check"):
        assert command in result.output


def test_migrate_brings_the_database_to_head(settings, cli_args):
    result = runner.invoke(cli, ["migrate", *cli_args])
    assert result.exit_code == 0, result.output
    assert f"database at revision {migrations.head_revision()}" in result.output


def test_create_token_prints_a_working_token_once(settings, cli_args):
    result = runner.invoke(
        cli, ["create-token", "--name", "alice", "--role", "maintainer", *cli_args]
    )
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    engine, sessions = open_database(settings)
    try:
        with sessions() as session:
            token = authenticate(session, secret)
            assert (token.name, token.role) == ("alice", "maintainer")
    finally:
        engine.dispose()


def test_create_token_rejects_a_name_that_is_not_a_namespace(cli_args):
    result = runner.invoke(
        cli, ["create-token", "--name", "Alice!", "--role", "contributor", *cli_args]
    )
    assert result.exit_code != 0
    assert "must be a namespace" in result.output


def test_register_base_records_the_models_linear_modules(settings, cli_args, tiny_base, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_base.model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    result = runner.invoke(cli, ["register-base", str(model_dir), "--name", "tiny", *cli_args])

    assert result.exit_code == 0, result.output
    engine, sessions = open_database(settings)
    try:
        with sessions() as session:
            assert get_by_name(session, "tiny").to_spec() == tiny_base.spec
    finally:
        engine.dispose()


def test_check_reports_a_healthy_store(cli_args):
    result = runner.invoke(cli, ["check", *cli_args])
    assert result.exit_code == 0
    assert "every catalog file has its blob" in result.output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_starts_with_zero_setup(tmp_path: Path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHATGOOSE_")}
    phatgoose = Path(sys.executable).parent / "phatgoose"
    process = subprocess.Popen(
        [str(phatgoose), "coordinator", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.2)
        assert response.json()["database"] == "sqlite"
        assert (tmp_path / ".phatgoose" / "coordinator" / "coordinator.sqlite").is_file()
        assert (tmp_path / ".phatgoose" / "coordinator" / "blobs").is_dir()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("item", "parsed"),
    [
        ("density=0.5", ("density", 0.5)),
        ("seed=7", ("seed", 7)),
        ("scale=1e-1", ("scale", 0.1)),
        ("merge=ties", ("merge", "ties")),
        (" score = spectrum", ("score", "spectrum")),
    ],
)
def test_a_param_value_is_an_int_else_a_float_else_a_string(item, parsed):
    name, value = parse_param(item)
    assert (name, value) == parsed and type(value) is type(parsed[1])


def test_create_release_help_says_which_methods_take_which_params():
    result = runner.invoke(cli, ["create-release", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(re.sub("[│─╭╮╰╯]", " ", result.output).split())  # no rich boxes
    for spec in METHOD_SPECS.values():
        for param in spec.params:
            assert param.name in text
    assert "ties: density (a number > 0 and <= 1; default 0.2), scale" in text
    assert "the other methods take none" in text


@pytest.fixture
def two_experts(client, alice, tiny_base, tmp_path):
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, alice, tiny_base, tmp_path / "b", "alice/b", seed=1, rank=2)


def test_create_release_records_the_given_params(app, cli_args, two_experts):
    args = ["create-release", "dare", "alice/a", "alice/b", "--param", "drop_rate=0.5"]
    result = runner.invoke(cli, [*args, "--param", "seed=3", "--param", "merge=ties", *cli_args])
    assert result.exit_code == 0, result.output
    assert "release 1: dare, drop_rate 0.5, merge ties, scale 1, seed 3 over 2 expert(s)" in (
        result.output
    )
    assert "privacy: no DP guarantee (2 of 2 experts without DP)" in result.output
    with app.state.sessionmaker() as session:
        release = get_release(session, 1)
        assert release.method_params == {"drop_rate": 0.5, "merge": "ties", "scale": 1.0, "seed": 3}
        assert release.manifest["method_params"] == release.method_params
        assert release.created_by == "operator"


def test_create_release_refuses_a_param_the_method_does_not_take(app, cli_args, two_experts):
    args = ["create-release", "ties", "alice/a", "--param", "density=2", *cli_args]
    result = runner.invoke(cli, args)
    assert result.exit_code == 1
    assert "params: method 'ties': parameter 'density' must be a number > 0 and <= 1, got 2" in (
        " ".join(result.output.split())
    )
    result = runner.invoke(cli, ["create-release", "ties", "alice/a", "--param", "density"])
    assert result.exit_code != 0 and "expected NAME=VALUE" in result.output
    with app.state.sessionmaker() as session:
        assert list_releases(session) == []
