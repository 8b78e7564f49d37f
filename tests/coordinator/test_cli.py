"""`phatgoose coordinator ...` commands."""

from __future__ import annotations

import os
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
from coordinator.core.app import open_database
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
