"""`phatgoose client diff A B`: two local package directories, or published versions fetched
from a live coordinator and checked against the sha256 it lists."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from client.catalog import FetchError, VersionRef, fetch_version, parse_ref
from client.push import RetryPolicy, push_package
from phatgoose.models import load_base_model
from protocol import ROUTER_FILE
from protocol.diff import diff_packages
from tests.client.conftest import run_cli
from tests.client.helpers import live_coordinator
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    """The tiny base as loaded from its directory: experts name it by that path, as the
    live coordinator registers it."""
    return load_base_model(str(tiny_base_dir))[0]


@pytest.fixture
def two_packages(base, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    random_expert(base, name="alice/x", rank=4, seed=0).save(a)
    random_expert(base, name="alice/x", rank=8, seed=1).save(b)
    return a, b


def test_diff_of_two_directories_prints_the_summary_and_layers(two_packages):
    a, b = two_packages

    result = run_cli("diff", a, b)

    assert result.exit_code == 0, result.output
    assert "modules: 14 changed, 0 unchanged, 0 added, 0 removed" in result.output
    expected = diff_packages(a, b).summary
    assert f"median {expected.median_relative_change:.4g}" in result.output
    assert f"mean gate cosine {expected.mean_gate_cosine:.4g}" in result.output
    assert "model.layers.0" in result.output and "model.layers.1" in result.output


def test_json_is_the_whole_diff(two_packages):
    a, b = two_packages

    result = run_cli("diff", a, b, "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == diff_packages(a, b).model_dump(mode="json")


def test_retrained_gates_alone_are_called_out(two_packages, tmp_path):
    a, _ = two_packages
    b = tmp_path / "gates"
    shutil.copytree(a, b)
    router = load_file(b / ROUTER_FILE)
    save_file({k: (v * 1.5).astype(np.float32) for k, v in router.items()}, b / ROUTER_FILE)

    result = run_cli("diff", a, b, "--modules")

    assert result.exit_code == 0, result.output
    assert "only gates changed" in result.output
    assert "router.safetensors differs" in result.output
    assert "adapter_model.safetensors identical" in result.output


def test_different_base_models_exit_1_with_the_reason(two_packages, tmp_path):
    a, _ = two_packages
    other = tmp_path / "other"
    random_expert(tiny_llama(seed=3), name="alice/x", rank=4, seed=0).save(other)

    result = run_cli("diff", a, other)

    assert result.exit_code == 1
    assert "same base model" in result.output


def test_an_argument_that_is_neither_a_directory_nor_a_reference_exits_2(two_packages, monkeypatch):
    a, _ = two_packages
    monkeypatch.delenv("PHATGOOSE_COORDINATOR", raising=False)

    assert run_cli("diff", a, "no-such-thing").exit_code == 2
    published = run_cli("diff", a, "alice/x@1")
    assert published.exit_code == 2
    assert "--coordinator" in published.output


def test_help_explains_the_numbers():
    result = run_cli("diff", "--help")

    assert result.exit_code == 0
    assert "relative change" in result.output and "gate" in result.output


def test_published_versions_are_fetched_and_diffed(tmp_path, tiny_base_dir, two_packages):
    a, b = two_packages
    with live_coordinator(tmp_path / "coordinator", tiny_base_dir) as live:
        for package in (a, b):
            push_package(package, live.url, live.token, progress=False)

        remote = run_cli("diff", "alice/x@1", "alice/x@2", "--coordinator", live.url, "--json")
        mixed = run_cli("diff", a, "alice/x@2", "--coordinator", live.url, "--json")

    assert remote.exit_code == 0, remote.output
    fetched, local = json.loads(remote.stdout), diff_packages(a, b).model_dump(mode="json")
    # The coordinator stores a canonical adapter config: its bytes differ, its numbers don't.
    assert fetched["modules"] == local["modules"]
    assert fetched["summary"] == local["summary"]
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.stdout)["modules"] == local["modules"]


def test_a_file_that_is_not_what_the_catalog_lists_is_refused(tmp_path):
    listed = {"filename": "expert.json", "sha256": "0" * 64, "size": 2}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/files/expert.json"):
            return httpx.Response(200, content=b"{}")
        return httpx.Response(200, json={"files": [listed]})

    with pytest.raises(FetchError, match=r"expert\.json.*expected 2 bytes with sha256 0{64}"):
        fetch_version(
            VersionRef("alice", "x", 1),
            "http://coordinator.test",
            tmp_path / "out",
            transport=httpx.MockTransport(handler),
            retry=RetryPolicy(attempts=1),
        )
    assert not (tmp_path / "out" / "expert.json").exists()


def test_only_package_files_are_fetched(tmp_path):
    listed = {"filename": "../../escape", "sha256": "0" * 64, "size": 2}
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"files": [listed]}))

    with pytest.raises(FetchError, match="not a package file"):
        fetch_version(
            VersionRef("alice", "x", 1), "http://coordinator.test", tmp_path, transport=transport
        )


@pytest.mark.parametrize("text", ["alice/x", "alice@1", "alice/x@0", "a/b/c@1", "alice/x@1 "])
def test_malformed_references_are_not_references(text):
    assert parse_ref(text) is None
