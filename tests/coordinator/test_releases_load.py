"""A release loads for inference in one call, from an exported directory and from a live
coordinator, and gives exactly the logits of build_routed_model over the same experts."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from coordinator.cli import app as cli
from phatgoose.expert import Expert
from phatgoose.release import load_release
from phatgoose.routing import build_routed_model, routing_state
from protocol import RELEASE_FILE
from tests.coordinator.helpers import live_server
from tests.coordinator.release_helpers import create_release, publish
from tests.tiny import tiny_llama, tiny_tokenizer


def _published(client, alice, bob, tiny_base, tmp_path):
    """Two experts through the API; the same experts loaded from their package folders,
    named as the release names them."""
    publish(client, alice, tiny_base, tmp_path / "a", "alice/a", seed=0)
    publish(client, bob, tiny_base, tmp_path / "b", "bob/b", seed=1)
    return [Expert.load(tmp_path / "a"), Expert.load(tmp_path / "b")]


def _logits(model):
    input_ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_exported_directory_loads_to_the_logits_of_build_routed_model(
    client, settings, maintainer, alice, bob, tiny_base, tmp_path
):
    experts = _published(client, alice, bob, tiny_base, tmp_path)
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"], top_k=2)
    out = tmp_path / "release"
    result = CliRunner().invoke(
        cli,
        [
            "export-release",
            "1",
            str(out),
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.resolved_database_url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "release 1 (phatgoose, 2 experts) written to" in result.output
    assert (out / RELEASE_FILE).is_file()
    assert (out / "experts/bob/b/1/adapter_model.safetensors").is_file()

    model, _ = load_release(out, base_model=(tiny_llama(), tiny_tokenizer()))
    reference = build_routed_model(tiny_llama(), experts, method="phatgoose", top_k=2)
    assert torch.equal(_logits(model), _logits(reference))
    assert routing_state(model).expert_names == ["alice/a", "bob/b"]


def test_export_of_a_missing_release_exits_1(settings):
    result = CliRunner().invoke(
        cli,
        [
            "export-release",
            "4",
            str(settings.data_dir / "out"),
            "--data-dir",
            str(settings.data_dir),
            "--database-url",
            settings.resolved_database_url,
        ],
    )
    assert result.exit_code == 1
    assert "no release 4" in result.output


def test_live_coordinator_url_loads_to_the_same_logits(
    app, client, maintainer, alice, bob, tiny_base, tmp_path
):
    experts = _published(client, alice, bob, tiny_base, tmp_path)
    create_release(client, maintainer, method="arrow", experts=["alice/a", "bob/b"], top_k=1)
    cache = tmp_path / "cache"
    with live_server(app) as url:
        model, _ = load_release(
            f"{url}/api/v1/releases/1",
            base_model=(tiny_llama(), tiny_tokenizer()),
            cache_dir=cache,
        )
    reference = build_routed_model(tiny_llama(), experts, method="arrow", top_k=1)
    assert torch.equal(_logits(model), _logits(reference))
    version = client.get("/api/v1/experts/bob/b/1").json()
    cached = cache / version["package_digest"].removeprefix("sha256:")
    assert sorted(p.name for p in cached.iterdir()) == sorted(
        f["filename"] for f in version["files"]
    )


def test_cached_files_are_reused_without_the_coordinator(
    app, client, maintainer, alice, bob, tiny_base, tmp_path
):
    experts = _published(client, alice, bob, tiny_base, tmp_path)
    create_release(client, maintainer, method="phatgoose", experts=["alice/a", "bob/b"])
    cache = tmp_path / "cache"
    with live_server(app) as url:
        release_url = f"{url}/api/v1/releases/1"
        load_release(release_url, base_model=(tiny_llama(), tiny_tokenizer()), cache_dir=cache)
        # Every file is now cached: blobs gone from the coordinator do not matter.
        for blob in (app.state.settings.data_dir / "blobs").rglob("*"):
            if blob.is_file():
                blob.unlink()
        model, _ = load_release(
            release_url, base_model=(tiny_llama(), tiny_tokenizer()), cache_dir=cache
        )
    reference = build_routed_model(tiny_llama(), experts, method="phatgoose", top_k=2)
    assert torch.equal(_logits(model), _logits(reference))
