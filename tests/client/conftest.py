from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from tests.client.helpers import save_tiny_base, write_private_data

# A few steps on the tiny model: enough to move the LoRA and the gates.
TINY_TRAINING = [
    "--steps",
    "4",
    "--gate-steps",
    "3",
    "--batch-size",
    "4",
    "--max-length",
    "48",
    "--lr",
    "0.01",
    "--quiet",
]


def run_cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def private_data(tmp_path_factory) -> Path:
    return write_private_data(tmp_path_factory.mktemp("data") / "private.jsonl")


@pytest.fixture(scope="session")
def trained_package(tmp_path_factory, tiny_base_dir, private_data) -> Path:
    """One expert trained through the CLI on the tiny base, shared by the tests reading it."""
    out = tmp_path_factory.mktemp("package") / "quokka"
    result = run_cli(
        "train",
        "--data",
        private_data,
        "--name",
        "quokka",
        "--base",
        tiny_base_dir,
        "--out",
        out,
        *TINY_TRAINING,
    )
    assert result.exit_code == 0, result.output
    return out
