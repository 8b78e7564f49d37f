"""REFERENCE ONLY, for the routing-cost benchmark: a routed linear that computes every expert.

METHOD.md: "computing all N and masking is correct but wastes work that grows with N". This
is that dense implementation, kept beside the real one (`phatgoose.routing.RoutedLinear`,
which computes only the selected experts) so the benchmark can show what the sparse path
saves. It uses the same router and the same stacked factors as the layer it wraps:

    h = u A_all^T                    [T, N*r]   every expert's low-rank projection
    h_z <- w_z * h_z                 weights are zero outside the token's top-k
    y = W u + h B_all                [T, d]     B_all stacks every expert's B^T

FLOPs per token: 2 N r (n + d), against 2 k r (n + d) for the selected-only layer.
Not used by the platform.
"""

from __future__ import annotations

from torch import Tensor, nn

from phatgoose.routing.layer import RoutedLinear


class DenseRoutedLinear(nn.Module):
    """All N experts for every token, then masked by the router's top-k weights."""

    lora_A_all: Tensor  # [N * r, n]
    lora_B_all: Tensor  # [N * r, d]

    def __init__(self, routed: RoutedLinear) -> None:
        super().__init__()
        self.routed = routed
        num, rank, n = routed.lora_A.shape
        d = routed.out_features
        # Views where the layout allows (no copy), copies otherwise.
        self.register_buffer("lora_A_all", routed.lora_A.reshape(num * rank, n), persistent=False)
        self.register_buffer(
            "lora_B_all", routed.lora_B.transpose(1, 2).reshape(num * rank, d), persistent=False
        )

    def forward(self, u: Tensor) -> Tensor:
        routed = self.routed
        num, rank, _ = routed.lora_A.shape
        flat = u.reshape(-1, u.shape[-1])
        indices, weights = routed.router(flat)
        # Dense weights [T, N]: the top-k weights in place, zero elsewhere.
        dense = flat.new_zeros(flat.shape[0], num)
        dense.scatter_(1, indices, weights.to(flat.dtype))
        hidden = (flat @ self.lora_A_all.T).view(-1, num, rank) * dense[:, :, None]
        update = hidden.reshape(-1, num * rank) @ self.lora_B_all
        return routed.base_layer(u) + update.reshape(*u.shape[:-1], -1)


def densify(model: nn.Module) -> dict[str, RoutedLinear]:
    """Replace every `RoutedLinear` of a token router by its dense reference; returns them."""
    replaced = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, RoutedLinear):
            replaced[path] = module
            _set(model, path, DenseRoutedLinear(module))
    return replaced


def undensify(model: nn.Module, replaced: dict[str, RoutedLinear]) -> None:
    """Put the selected-only layers back."""
    for path, module in replaced.items():
        _set(model, path, module)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
