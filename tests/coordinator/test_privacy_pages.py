"""Differential privacy in the catalog: an expert version's API body and pages show the
guarantee its manifest states, and a release reports the weakest among its experts
(`protocol.privacy.weakest_guarantee`): none at all as soon as one expert has none."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from protocol import TrainingSummary
from protocol.privacy import (
    PrivacyGuarantee,
    accounted_epsilon,
    noise_multiplier_for,
)
from tests.coordinator.helpers import TinyBase, upload
from tests.coordinator.web_helpers import create_release, table_rows
from tests.phatgoose.experts import random_expert

# 1000 examples in batches of 10: each example's chance per step is 1%; 50 LoRA steps and
# 10 gate steps, all under DP-SGD.
EXAMPLES, BATCH_SIZE, STEPS, GATE_STEPS = 1000, 10, 50, 10
TRAINING = TrainingSummary(
    examples=EXAMPLES, steps=STEPS, gate_steps=GATE_STEPS, batch_size=BATCH_SIZE
)
DELTA = 1e-5


@pytest.fixture(scope="module")
def guarantee() -> PrivacyGuarantee:
    """What admission accepts for `TRAINING`: the accountant's own epsilon for a noise
    multiplier chosen to spend about 8."""
    sample_rate = BATCH_SIZE / EXAMPLES
    steps = STEPS + GATE_STEPS
    noise = noise_multiplier_for(epsilon=8, delta=DELTA, sample_rate=sample_rate, steps=steps)
    epsilon = accounted_epsilon(
        noise_multiplier=noise, sample_rate=sample_rate, steps=steps, delta=DELTA, accountant="rdp"
    )
    return PrivacyGuarantee(
        epsilon=epsilon,
        delta=DELTA,
        max_grad_norm=1.0,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        library="opacus 1.6.0",
    )


def publish(
    client: TestClient,
    headers: dict[str, str],
    tiny_base: TinyBase,
    directory: Path,
    name: str,
    privacy: PrivacyGuarantee | None,
) -> None:
    expert = random_expert(tiny_base.model, name=name, rank=4, seed=len(name))
    expert.manifest = expert.manifest.model_copy(update={"training": TRAINING, "privacy": privacy})
    expert.save(directory)
    response = upload(client, headers, directory)
    assert response.status_code == 201, response.text


@dataclass(frozen=True)
class World:
    mixed: int  # release of alice/private@1 and alice/public@1
    private_only: int  # release of alice/private@1 alone


@pytest.fixture
def world(
    client: TestClient,
    alice: dict[str, str],
    maintainer: dict[str, str],
    tiny_base: TinyBase,
    tmp_path: Path,
    guarantee: PrivacyGuarantee,
) -> World:
    publish(client, alice, tiny_base, tmp_path / "private", "alice/private", guarantee)
    publish(client, alice, tiny_base, tmp_path / "public", "alice/public", None)
    mixed = create_release(
        client, maintainer, method="phatgoose", experts=["alice/private@1", "alice/public@1"]
    )
    private_only = create_release(
        client, maintainer, method="phatgoose", experts=["alice/private@1"]
    )
    return World(mixed=mixed, private_only=private_only)


def test_a_versions_json_carries_its_guarantee_and_null_without_one(client, world, guarantee):
    private = client.get("/api/v1/experts/alice/private/1").json()
    assert PrivacyGuarantee.model_validate(private["privacy"]) == guarantee
    assert client.get("/api/v1/experts/alice/public/1").json()["privacy"] is None
    listed = client.get("/api/v1/experts", params={"namespace": "alice"}).json()["items"]
    by_name = {item["name"]: item["privacy"] for item in listed}
    assert by_name["public"] is None
    assert by_name["private"]["epsilon"] == guarantee.epsilon


def test_a_release_with_an_expert_without_dp_reports_no_guarantee(client, world):
    privacy = client.get(f"/api/v1/releases/{world.mixed}").json()["privacy"]
    assert privacy == {"experts": 2, "without": 1, "epsilon": None, "delta": None}


def test_a_release_of_dp_experts_reports_the_weakest_guarantee(client, world, guarantee):
    expected = {"experts": 1, "without": 0, "epsilon": guarantee.epsilon, "delta": DELTA}
    assert client.get(f"/api/v1/releases/{world.private_only}").json()["privacy"] == expected
    listed = {r["number"]: r["privacy"] for r in client.get("/api/v1/releases").json()}
    assert listed[world.private_only] == expected
    assert listed[world.mixed]["without"] == 1


# --- the pages --------------------------------------------------------------------------


def test_the_catalog_shows_epsilon_for_a_dp_expert_and_none_for_the_other(client, world, guarantee):
    rows = table_rows(client.get("/ui/experts").text, "experts")
    dp_column = {row[0]: row[4] for row in rows}
    assert dp_column == {"alice/private": f"ε {guarantee.epsilon:.2f}", "alice/public": "none"}


def test_the_expert_page_lists_the_guarantee(client, world, guarantee):
    html = client.get("/ui/experts/alice/private").text
    assert 'id="v1-privacy"' in html
    for fact in (
        f"<dt>Epsilon (ε)</dt><dd>{guarantee.epsilon:.2f}</dd>",
        "<dt>Delta (δ)</dt><dd>1e-05</dd>",
        "<dt>Clip</dt><dd>1.0 (max gradient norm per example)</dd>",
        f"<dt>Noise multiplier</dt><dd>{guarantee.noise_multiplier:.4g}</dd>",
        "<dt>Sample rate</dt><dd>0.01</dd>",
        "<dt>Steps</dt><dd>60 (LoRA and gate steps)</dd>",
        "<dt>Accountant</dt><dd>rdp</dd>",
        "<dt>Library</dt><dd>opacus 1.6.0</dd>",
    ):
        assert fact in html
    assert "without a differential-privacy guarantee" not in html


def test_the_expert_page_says_when_an_expert_was_trained_without_dp(client, world):
    html = client.get("/ui/experts/alice/public").text
    assert "Trained without a differential-privacy guarantee" in html
    assert "docs/privacy.md" in html
    assert "<dt>Epsilon (ε)</dt>" not in html


def test_the_release_pages_show_the_weakest_guarantee(client, world, guarantee):
    mixed = client.get(f"/ui/releases/{world.mixed}").text
    assert '<dd id="privacy">no DP guarantee (1 of 2 experts without DP)</dd>' in mixed
    dp_column = [row[5] for row in table_rows(mixed, "release-experts")]
    assert dp_column == [f"ε {guarantee.epsilon:.2f}", "none"]

    private_only = client.get(f"/ui/releases/{world.private_only}").text
    summary = f"every expert DP, weakest ε = {guarantee.epsilon:.2f}, δ = 1e-05"
    assert f'<dd id="privacy">{summary}</dd>' in private_only

    rows = table_rows(client.get("/ui/releases").text, "table0")
    dp_by_release = {row[0]: row[7] for row in rows}
    assert dp_by_release == {
        f"#{world.private_only}": f"ε {guarantee.epsilon:.2f}",
        f"#{world.mixed}": "none (1 of 2 without DP)",
    }
