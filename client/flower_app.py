"""The Flower ClientApp: a contributor's SuperNode trains an expert on its private data.

On a `train` message (a `protocol.flower.TrainingRequest` in the ConfigRecord `"config"`),
the node trains LoRA and gates through the same service as `phatgoose client train`, and
replies with the expert package (`client.flower_message`): arrays and the manifest, never
the data.

The node's private data and the expert's name come from the SuperNode's node config:

    flower-supernode ... --node-config 'data-path="/data/mine.jsonl" expert-name="mine"'

In a local simulation (no node config), the run config's `simulation-datasets`
(`"name=path;name=path"`) gives node `partition-id` its dataset. A contributor who wants
differential privacy whatever the server asks adds `dp-epsilon=8` (say) to the node config.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.flower_message import package_to_content
from client.training import ContributorOptions, train_contributor_expert
from phatgoose.training import DifferentialPrivacy, TrainingConfig
from protocol import slug
from protocol.flower import (
    KNOWN_KEY,
    KNOWN_RECORD,
    TRAIN_CONFIG_RECORD,
    TrainingRequest,
    split_run_config,
)

log = logging.getLogger(__name__)


class NodeConfigError(ValueError):
    """The SuperNode was started without saying where its data is."""


def node_dataset(context: Context) -> tuple[str, str]:
    """`(data path, expert name)` of this node."""
    node = context.node_config
    if "data-path" in node:
        path = str(node["data-path"])
        return path, str(node.get("expert-name", "") or _stem(path))
    _, round_settings = split_run_config(context.run_config)
    datasets = round_settings.simulation_datasets
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


def private_settings(
    request: TrainingRequest, node_config: Mapping[str, Any] | None = None
) -> DifferentialPrivacy | None:
    """The DP budget of this node's expert: the stricter of the federation's (the run
    config's `dp-epsilon`) and the contributor's own (the node config's `dp-epsilon`, which
    the server cannot loosen); None when neither asks for one."""
    own = (node_config or {}).get("dp-epsilon", 0)
    try:
        own_epsilon = float(own)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config dp-epsilon {own!r} is not a number") from None
    if not math.isfinite(own_epsilon) or own_epsilon < 0:
        raise NodeConfigError(f"node config dp-epsilon {own!r} must be a number >= 0")
    asked = [e for e in (request.dp_epsilon, own_epsilon) if e > 0]
    if not asked:
        return None
    return DifferentialPrivacy(
        epsilon=min(asked),
        delta=request.dp_delta or None,
        max_grad_norm=request.dp_max_grad_norm,
    )


def contributor_settings(
    request: TrainingRequest, node_config: Mapping[str, Any] | None = None
) -> tuple[TrainingConfig, ContributorOptions]:
    """What `client.training` needs to carry out a train request on this node. Under DP
    the node ships no average activations (nothing privatises them)."""
    dp = private_settings(request, node_config)
    training = TrainingConfig(
        r=request.lora_rank,
        lora_alpha=request.lora_alpha,
        steps=request.lora_steps,
        gate_steps=request.gate_steps,
        batch_size=request.batch_size,
        max_length=request.max_length,
        learning_rate=request.learning_rate,
        gate_learning_rate=request.gate_learning_rate or None,
        seed=request.seed,
        precision=request.precision,
        dp=dp,
    )
    if dp is not None and request.average_activation:
        log.info("differentially private training: no average activations are shipped")
    options = ContributorOptions(
        max_examples=request.max_examples or None,
        average_activation=request.average_activation and dp is None,
        progress=False,
    )
    return training, options


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train an expert on this node's data; reply with its package."""
    data_path, name = node_dataset(context)
    request = TrainingRequest.from_config(msg.content.config_records.get(TRAIN_CONFIG_RECORD, {}))
    training, options = contributor_settings(request, context.node_config)
    if context.node_config.get("show-progress", False):
        options = replace(options, progress=True)
    log.info("node %s: training expert %r on its private data", context.node_id, name)
    expert = train_contributor_expert(
        data_path, name, base=request.base_model, config=training, options=options, say=log.info
    )
    summary = expert.manifest.training
    with tempfile.TemporaryDirectory(prefix="phatgoose-expert-") as tmp:
        expert.save(tmp)
        content = package_to_content(
            tmp,
            known=known_tensors(msg),
            training={
                "examples": summary.examples,
                "steps": summary.steps,
                "gate-steps": summary.gate_steps,
                "final-loss": summary.final_loss or 0.0,
                "seconds": summary.seconds or 0.0,
            },
        )
    return Message(content, reply_to=msg)


def known_tensors(msg: Message) -> frozenset[str]:
    """The digests of tensors the coordinator stores for this node (not sent again)."""
    record = msg.content.config_records.get(KNOWN_RECORD)
    listed = record.get(KNOWN_KEY, []) if record is not None else []
    return (
        frozenset(d for d in listed if isinstance(d, str))
        if isinstance(listed, list)
        else frozenset()
    )


def _stem(path: str) -> str:
    return slug(Path(path).stem)
