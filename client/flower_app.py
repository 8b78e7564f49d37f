"""The Flower ClientApp: a contributor's SuperNode trains an expert on its private data.

On a `train` message (the run's hyper-parameters in the ConfigRecord `"config"`), the node
trains LoRA and gates through the same service as `phatgoose client train`, and replies with
the expert package (`client.flower_message`): arrays and the manifest, never the data.

The node's private data and the expert's name come from the SuperNode's node config:

    flower-supernode ... --node-config 'data-path="/data/mine.jsonl" expert-name="mine"'

In a local simulation (no node config), the run config's `simulation-datasets`
(`"name=path;name=path"`) gives node `partition-id` its dataset.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.flower_message import package_to_content
from client.training import CPU_DEFAULTS, ContributorOptions, slug, train_contributor_expert
from phatgoose.models import DEFAULT_BASE_MODEL
from phatgoose.training import TrainingConfig

log = logging.getLogger(__name__)

TRAIN_CONFIG_RECORD = "config"


class NodeConfigError(ValueError):
    """The SuperNode was started without saying where its data is."""


def node_dataset(context: Context) -> tuple[str, str]:
    """`(data path, expert name)` of this node."""
    node = context.node_config
    if "data-path" in node:
        path = str(node["data-path"])
        return path, str(node.get("expert-name", "") or _stem(path))
    datasets = str(context.run_config.get("simulation-datasets", ""))
    if datasets and "partition-id" in node:
        entries = [e.strip() for e in datasets.split(";") if e.strip()]
        partition = int(node["partition-id"])
        if partition >= len(entries):
            raise NodeConfigError(
                f"simulation-datasets lists {len(entries)} datasets; node {partition} has none"
            )
        name, _, path = entries[partition].partition("=")
        return path.strip(), name.strip()
    raise NodeConfigError(
        "this SuperNode has no private data: start it with "
        '--node-config \'data-path="/path/data.jsonl" expert-name="my-expert"\''
    )


def training_config(config: Mapping[str, Any]) -> tuple[str, TrainingConfig, ContributorOptions]:
    """`(base model, TrainingConfig, options)` from a train message's hyper-parameters."""
    d = CPU_DEFAULTS
    gate_lr = float(config.get("gate-learning-rate", 0) or 0)
    max_examples = int(config.get("max-examples", 0) or 0)
    training = TrainingConfig(
        r=int(config.get("lora-rank", d.r)),
        lora_alpha=float(config.get("lora-alpha", d.lora_alpha)),
        steps=int(config.get("lora-steps", d.steps)),
        gate_steps=int(config.get("gate-steps", d.gate_steps or 1)),
        batch_size=int(config.get("batch-size", d.batch_size)),
        max_length=int(config.get("max-length", d.max_length)),
        learning_rate=float(config.get("learning-rate", d.learning_rate)),
        gate_learning_rate=gate_lr or None,
        seed=int(config.get("seed", d.seed)),
    )
    options = ContributorOptions(
        max_examples=max_examples or None,
        average_activation=bool(config.get("average-activation", True)),
        progress=False,
    )
    return str(config.get("base-model", DEFAULT_BASE_MODEL)), training, options


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train an expert on this node's data; reply with its package."""
    data_path, name = node_dataset(context)
    config = msg.content.config_records.get(TRAIN_CONFIG_RECORD, {})
    base, training, options = training_config(config)
    if context.node_config.get("show-progress", False):
        options = replace(options, progress=True)
    log.info("node %s: training expert %r on its private data", context.node_id, name)
    expert = train_contributor_expert(
        data_path, name, base=base, config=training, options=options, say=log.info
    )
    summary = expert.manifest.training
    with tempfile.TemporaryDirectory(prefix="phatgoose-expert-") as tmp:
        expert.save(tmp)
        content = package_to_content(
            tmp,
            training={
                "examples": summary.examples,
                "steps": summary.steps,
                "gate-steps": summary.gate_steps,
                "final-loss": summary.final_loss or 0.0,
                "seconds": summary.seconds or 0.0,
            },
        )
    return Message(content, reply_to=msg)


def _stem(path: str) -> str:
    return slug(Path(path).stem)
