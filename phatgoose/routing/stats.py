"""Routing statistics: how often each expert is chosen, per module.

    with capture_routing(model) as stats:
        model(**batch)
    stats.frequencies("model.layers.0.self_attn.q_proj")   # Tensor[N], sums to 1
    labels, heatmap = stats.per_layer()                      # experts x layers

Token routers count every top-k slot of every token; tokens the attention mask marks as
padding are left out where the mask matches the module's tokens (see `_mask_for`).
Routers with one decision per query (single, retrieval, per-example PHATGOOSE) count once
per batch row and forward; where every expert is weighed (SMEAR-style merging) the count
goes to the expert weighed most. Merged layers choose nothing and are not counted.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.model import encoder_prefix, routing_state
from phatgoose.routing.routers import PromptRouter


@dataclass
class RoutingStats:
    """Per module path, how many times each of the routed model's experts was selected."""

    expert_names: list[str]
    top_k: int = 0
    counts: dict[str, Tensor] = field(default_factory=dict)  # path -> int64 [N]

    def record(
        self, path: str, expert_ids: list[int], indices: Tensor, mask: Tensor | None
    ) -> None:
        """Add one forward's selections `indices [..., k]` (local expert indices) at `path`."""
        if mask is not None and tuple(mask.shape) == tuple(indices.shape[:-1]):
            indices = indices[mask.to(indices.device).bool()]
        local = torch.bincount(indices.reshape(-1).cpu(), minlength=len(expert_ids))
        counts = self.counts.setdefault(path, torch.zeros(len(self.expert_names), dtype=torch.long))
        counts[torch.tensor(expert_ids)] += local

    def frequencies(self, module: str) -> Tensor:
        """Share of selections per expert at `module`, `[N]` (all zeros if never routed)."""
        if module not in self.counts:
            raise KeyError(f"no routing recorded at {module!r}; recorded: {list(self.counts)[:5]}")
        counts = self.counts[module].double()
        return counts / counts.sum().clamp(min=1)

    def per_layer(self, module_filter: str | None = None) -> tuple[list[str], Tensor]:
        """`(layer labels, frequencies [N, L])` for an experts x layers heatmap.

        Modules are grouped by their block (the path up to its first number, such as
        `model.layers.3` or `decoder.block.1`), optionally only those whose path contains
        `module_filter`; each column sums to 1 (or 0 for a layer with no selections).
        """
        layers: dict[str, Tensor] = {}
        for path, counts in self.counts.items():
            if module_filter is not None and module_filter not in path:
                continue
            match = re.match(r"^(.*?\.\d+)(\.|$)", path)
            label = match.group(1) if match else path
            layers[label] = layers.get(label, torch.zeros_like(counts)) + counts
        if not layers:
            return [], torch.zeros(len(self.expert_names), 0)
        matrix = torch.stack(list(layers.values()), dim=1).double()
        return list(layers), matrix / matrix.sum(dim=0, keepdim=True).clamp(min=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: expert names, k and the raw counts per module."""
        return {
            "experts": list(self.expert_names),
            "top_k": self.top_k,
            "counts": {path: counts.tolist() for path, counts in self.counts.items()},
        }


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingStats]:
    """Count the experts chosen at every routed linear during the forwards in the block."""
    state = routing_state(model)
    stats = RoutingStats(
        expert_names=list(state.expert_names) if state else [],
        top_k=state.top_k if state else 0,
    )
    masks: dict[str, Tensor | None] = {}
    encoder = encoder_prefix(model)

    def remember_masks(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        masks["attention_mask"] = kwargs.get("attention_mask")
        masks["decoder_attention_mask"] = kwargs.get("decoder_attention_mask")

    def remember_encoder_mask(
        _module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        masks["attention_mask"] = kwargs.get("attention_mask")

    def observe(layer: RoutedLinear, indices: Tensor, weights: Tensor) -> None:
        if layer.expert_ids is None:
            return
        if isinstance(layer.router, PromptRouter) and layer.router.top_k is None:
            # Every expert weighed (SMEAR-style merging): count the one weighed most.
            indices = indices.gather(-1, weights.argmax(-1, keepdim=True))
        mask = _mask_for(layer.path, masks, encoder)
        stats.record(layer.path, layer.expert_ids, indices.detach(), mask)

    hooks = [model.register_forward_pre_hook(remember_masks, with_kwargs=True)]
    if encoder is not None:
        # generate() runs the encoder on its own, not through the model's forward.
        hooks.append(
            model.get_submodule(encoder).register_forward_pre_hook(
                remember_encoder_mask, with_kwargs=True
            )
        )
    layers = [m for m in model.modules() if isinstance(m, RoutedLinear)]
    for layer in layers:
        layer.observers.append(observe)
    try:
        yield stats
    finally:
        for layer in layers:
            layer.observers.remove(observe)
        for hook in hooks:
            hook.remove()


def _mask_for(
    path: str, masks: dict[str, Tensor | None], encoder_prefix: str | None
) -> Tensor | None:
    """The padding mask of a module's tokens: the input mask in a causal model or an
    encoder, `decoder_attention_mask` in a decoder. `record` applies it only when its shape
    matches the module's `[batch, seq]` (so cached decoding steps count every token).
    Cross-attention keys/values of a decoder read encoder states; they count every position.
    """
    if encoder_prefix is None or path.startswith(encoder_prefix + "."):
        return masks.get("attention_mask")
    return masks.get("decoder_attention_mask")
