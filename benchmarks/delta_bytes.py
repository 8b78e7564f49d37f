"""Bytes a new expert version costs: sent by `phatgoose client push` and stored by the
coordinator, for the ways contributors make new versions (issue 19, section 2).

On a real base model and a real BIG-bench task, one contributor trains an expert, then makes
new versions of it, each pushed (as a delta: only the tensors the coordinator lacks) to a
coordinator served on loopback whose blob store is measured before and after:

1. `fresh`: the first expert, into an empty catalog (nothing to share);
2. `gates`: the same LoRA, its gates retrained (another seed) — PHATGOOSE's post-hoc step
   redone, e.g. after a gate-training fix;
3. `continued`: the LoRA trained further from where it was (`train_expert(resume_from=)`),
   then new gates;
4. `other`: a second, unrelated expert on another task.

For each: the package's bytes, the bytes sent (file and segment bodies; the layout and
multipart framing are not counted) and the bytes the blob store grew by, with the count of
segments sent. The push is checked to give the digest a whole upload gives.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from client.push import push_package
from coordinator.auth.models import Role
from coordinator.auth.service import create_token
from coordinator.base_models.service import register_base_model
from coordinator.core.app import create_app
from coordinator.core.config import Settings
from coordinator.core.loopback import serve_on_loopback
from phatgoose.bigbench import load_bigbench_task
from phatgoose.expert import Expert
from phatgoose.models import base_model_spec, load_base_model, model_fingerprint
from phatgoose.training import TrainingConfig, train_expert, train_gates
from protocol import BaseModelIdentity, BaseModelSpec
from protocol.validation import validate_directory

SCENARIOS = ("fresh", "gates", "continued", "other")


@dataclasses.dataclass(frozen=True)
class DeltaBytesConfig:
    base_model: str = "smollm2-135m"
    task: str = "hyperbaton"
    other_task: str = "navigate"
    steps: int = 20
    gate_steps: int = 20
    examples: int = 64
    batch_size: int = 8
    max_length: int = 128


def blob_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def served_coordinator(data_dir: Path, base: BaseModelSpec) -> Iterator[tuple[str, str, Settings]]:
    """A coordinator on loopback with `base` registered, and a contributor's token."""
    settings = Settings(data_dir=data_dir, log_level="WARNING")
    app = create_app(settings)
    with app.state.sessionmaker() as session:
        register_base_model(session, base)
        token = create_token(session, name="alice", role=Role.CONTRIBUTOR).secret_token
    try:
        with serve_on_loopback(app) as url:
            yield url, token, settings
    finally:
        app.state.engine.dispose()


def run(config: DeltaBytesConfig, tasks_dir: Path | None = None) -> dict[str, Any]:
    model, tokenizer = load_base_model(config.base_model)
    base = base_model_spec(model, config.base_model)
    # The experts name the base as the coordinator registers it (not its cache path).
    identity = BaseModelIdentity(name=config.base_model, fingerprint=model_fingerprint(model))
    training = TrainingConfig(
        steps=config.steps,
        gate_steps=config.gate_steps,
        batch_size=config.batch_size,
        max_length=config.max_length,
    )

    def examples(task: str) -> list[Any]:
        return load_bigbench_task(task, n_eval=0, tasks_dir=tasks_dir).training[: config.examples]

    own, other = examples(config.task), examples(config.other_task)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="delta-bytes-") as tmp:
        root = Path(tmp)
        with served_coordinator(root / "coordinator", base) as (url, token, settings):

            def push(scenario: str, expert: Expert, started: float) -> None:
                directory = expert.save(root / scenario)
                before = blob_bytes(settings.blob_dir)
                reply = push_package(directory, url, token, progress=False)
                validated = validate_directory(directory, base)
                assert reply["package_digest"] == validated.digest, "a delta changed the digest"
                transfer = reply["transfer"]
                rows.append(
                    {
                        "scenario": scenario,
                        "ref": reply["ref"],
                        "package_bytes": transfer["package_bytes"],
                        "sent_bytes": transfer["sent_bytes"],
                        "stored_bytes": blob_bytes(settings.blob_dir) - before,
                        "segments_sent": transfer["segments_sent"],
                        "segments_total": transfer["segments_total"],
                        "delta": transfer["delta"],
                        "training_seconds": round(time.perf_counter() - started, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)

            started = time.perf_counter()
            lora = train_expert(
                model, tokenizer, own, name="alice/expert", config=training, base_model=identity
            )
            first = train_gates(model, tokenizer, lora, own, config=training)
            push("fresh", first, started)

            started = time.perf_counter()
            reseeded = dataclasses.replace(training, seed=training.seed + 1)
            push("gates", train_gates(model, tokenizer, lora, own, config=reseeded), started)

            started = time.perf_counter()
            further = train_expert(
                model,
                tokenizer,
                own,
                name="alice/expert",
                config=training,
                base_model=identity,
                resume_from=lora,
            )
            push("continued", train_gates(model, tokenizer, further, own, config=training), started)

            started = time.perf_counter()
            fresh = train_expert(
                model, tokenizer, other, name="alice/other", config=training, base_model=identity
            )
            push("other", train_gates(model, tokenizer, fresh, other, config=training), started)
        shutil.rmtree(root, ignore_errors=True)
    return {"config": dataclasses.asdict(config), "rows": rows}


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    lines = [
        "# Bytes per new expert version (delta push)",
        "",
        f"Base `{result['config']['base_model']}`, task `{result['config']['task']}` "
        f"(other: `{result['config']['other_task']}`), {result['config']['steps']} LoRA "
        f"steps and {result['config']['gate_steps']} gate steps per training.",
        "",
        "| version | package bytes | sent | sent / package | stored | segments sent |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        share = row["sent_bytes"] / row["package_bytes"]
        lines.append(
            f"| {row['scenario']} ({row['ref']}) | {row['package_bytes']:,} | "
            f"{row['sent_bytes']:,} | {share:.1%} | {row['stored_bytes']:,} | "
            f"{row['segments_sent']} of {row['segments_total']} |"
        )
    lines += ["", f"Machine: {json.dumps(machine)}", ""]
    return "\n".join(lines)
