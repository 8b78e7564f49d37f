"""PEFT's LoRA adapter format as the expert package uses it (docs/expert-package.md).

The validator reads adapters with numpy and `phatgoose.Expert` with torch; both speak this
format, so its keys, its scaling and its module-selection rule are defined once, here.
"""

import math
import re
from collections.abc import Callable, Iterable
from typing import Literal

# PEFT saves LoRA tensors under the wrapped model's names, without the adapter name:
# `base_model.model.<module path in the base model>.lora_A.weight` (and `lora_B`).
PEFT_KEY_PREFIX = "base_model.model."
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

LoraMatrix = Literal["A", "B"]

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<matrix>[AB])\.weight$")


def lora_key(path: str, matrix: LoraMatrix) -> str:
    """The saved key of a LoRA matrix (`"A"` or `"B"`) at a base-model module path."""
    if matrix not in ("A", "B"):
        raise ValueError(f"matrix must be 'A' or 'B', got {matrix!r}")
    return f"{PEFT_KEY_PREFIX}{path}.lora_{matrix}.weight"


def lora_keys(path: str) -> tuple[str, str]:
    """The saved keys `(lora_A, lora_B)` of the module at a base-model path."""
    return lora_key(path, "A"), lora_key(path, "B")


def parse_lora_key(key: str) -> tuple[str, LoraMatrix] | None:
    """`(module path, "A" or "B")` named by a saved key; None if it is not a LoRA key."""
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    matrix: LoraMatrix = "A" if match["matrix"] == "A" else "B"
    return match["path"], matrix


def lora_scale(rank: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling of `B @ A`: alpha / r, or alpha / sqrt(r) when rank-stabilised."""
    return lora_alpha / math.sqrt(rank) if use_rslora else lora_alpha / rank


def matches_target_modules(path: str, names: Iterable[str]) -> bool:
    """PEFT's rule for a list of `target_modules` (or `exclude_modules`): a module path
    matches a name when it equals it or ends with `"." + name`."""
    return target_module_matcher(names)(path)


def target_module_matcher(names: Iterable[str]) -> Callable[[str], bool]:
    """`matches_target_modules` for many paths against one list of names.

    A path ends with `"." + name` exactly when the name is one of the path's dot-separated
    suffixes, so each path costs one set lookup per suffix (its depth), whatever the number
    of names: 1000 names against every module of a large model stay linear, not a product.
    """
    wanted = frozenset(names)

    def matches(path: str) -> bool:
        if path in wanted:
            return True
        start = path.find(".")
        while start != -1:
            if path[start + 1 :] in wanted:
                return True
            start = path.find(".", start + 1)
        return False

    return matches
