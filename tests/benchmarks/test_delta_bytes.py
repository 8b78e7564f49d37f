"""The delta-bytes benchmark on a tiny model: what each kind of new version sends and stores."""

from benchmarks.delta_bytes import SCENARIOS, DeltaBytesConfig, markdown, run
from tests.benchmarks.test_zero_shot import write_task
from tests.client.helpers import save_tiny_base


def test_each_version_sends_and_stores_only_what_changed(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    tasks = tmp_path / "tasks"
    write_task(tasks, "alpha", ["yes", "no"], 24)
    write_task(tasks, "beta", ["up", "down"], 24)
    config = DeltaBytesConfig(
        base_model=str(base),
        task="alpha",
        other_task="beta",
        steps=2,
        gate_steps=2,
        examples=16,
        batch_size=4,
        max_length=48,
    )

    result = run(config, tasks_dir=tasks)

    rows = {row["scenario"]: row for row in result["rows"]}
    assert tuple(rows) == SCENARIOS
    fresh, gates, continued, other = (rows[s] for s in SCENARIOS)
    # Nothing to share: the first expert goes whole; the unrelated one nearly so (its
    # safetensors headers, same shapes and offsets, may be stored already).
    assert not fresh["delta"] and fresh["sent_bytes"] == fresh["package_bytes"]
    assert other["sent_bytes"] > 0.9 * other["package_bytes"]
    for row in (fresh, other):
        # Stored nearly whole (equal tensors, within a package too, are stored once; the
        # adapter config is stored canonically rewritten).
        assert row["stored_bytes"] > row["package_bytes"] / 2
    # Gates retrained: the LoRA stays where it is; what goes is the router and the manifest.
    assert gates["delta"] and gates["sent_bytes"] < gates["package_bytes"] / 2
    assert gates["stored_bytes"] < gates["package_bytes"] / 2
    assert gates["segments_sent"] < gates["segments_total"] / 2
    # LoRA trained further: every LoRA tensor moved, so nearly everything goes again.
    assert continued["sent_bytes"] > gates["sent_bytes"]
    assert continued["segments_sent"] > gates["segments_sent"]
    assert [row["ref"] for row in result["rows"]] == [
        "alice/expert@1",
        "alice/expert@2",
        "alice/expert@3",
        "alice/other@1",
    ]
    text = markdown(result, {"cpu": "test"})
    assert "| gates (alice/expert@2) |" in text
