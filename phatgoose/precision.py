"""Compute precision: the one place that decides whether models compute in bfloat16.

`auto` computes in bfloat16 where the hardware multiplies bfloat16 matrices natively (a CPU
with AMX-BF16 or AVX512-BF16, or a CUDA device that supports bfloat16) and in float32
elsewhere (emulated bfloat16 is slower than float32 on CPUs without those units:
docs/benchmarks.md). `float32` and `bfloat16` override the decision.

Computing in bfloat16 (`compute_in`) is `torch.autocast` plus bfloat16 copies of the frozen
weights for the duration, so matrix products run in bfloat16 without re-casting every
weight on every call. What is trained stays float32 (master weights; the expert package
format does not change), the residual stream stays float32 (only products are bfloat16),
routers decide in float32 (`routing.routers`), the LM head runs in float32 (bfloat16 logits
are 0.06-0.125 apart at magnitudes 8-32, which could flip close choices; with
`logits_to_keep` the head is cheap) and losses and log-probabilities are accumulated in
float32 by the code that computes them.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from protocol import PRECISIONS, ComputePrecisionName, Precision

__all__ = [
    "BF16_CPU_FLAGS",
    "PRECISIONS",
    "PRECISION_ENV",
    "ComputePrecision",
    "Precision",
    "autocast_off",
    "compute_in",
    "cpu_bf16_flags",
    "resolve_precision",
]

# Pins what `auto` means on this machine (float32 or bfloat16), e.g. for a test suite whose
# results must not depend on the CPU it runs on; an explicit precision still wins.
PRECISION_ENV = "PHATGOOSE_PRECISION"

# /proc/cpuinfo flags of native bfloat16 matrix arithmetic (Intel AMX, Intel and AMD AVX512).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class ComputePrecision:
    """What was decided, and why (recorded next to results)."""

    dtype: torch.dtype
    requested: str
    reason: str

    @property
    def name(self) -> ComputePrecisionName:
        return "bfloat16" if self.dtype == torch.bfloat16 else "float32"

    def record(self) -> dict[str, str]:
        """The JSON a result records: `{"precision", "requested", "reason"}`."""
        return {"precision": self.name, "requested": self.requested, "reason": self.reason}


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The CPU's native bfloat16 features among `BF16_CPU_FLAGS`; `cpuinfo` is the text of
    `/proc/cpuinfo` (read when None; empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = (
            path.read_text(errors="replace") if sys.platform == "linux" and path.exists() else ""
        )
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return tuple(flag for flag in BF16_CPU_FLAGS if flag in flags)


def resolve_precision(
    requested: str = "auto",
    device: str | torch.device = "cpu",
    *,
    cpu_flags: tuple[str, ...] | None = None,
    cuda_bf16: bool | None = None,
) -> ComputePrecision:
    """The precision to compute in on `device`. `auto` follows `PHATGOOSE_PRECISION` when it
    is set, else the hardware; `cpu_flags` and `cuda_bf16` stand in for the hardware's
    answers (tests; they bypass the variable); by default they are detected."""
    if requested not in PRECISIONS:
        raise ValueError(
            f"precision {requested!r} is not one of {', '.join(PRECISIONS)} "
            "(auto: bfloat16 where the hardware has native bfloat16 matrix units)"
        )
    if requested != "auto":
        dtype = torch.bfloat16 if requested == "bfloat16" else torch.float32
        return ComputePrecision(dtype, requested, "asked for")
    pinned = os.environ.get(PRECISION_ENV, "")
    if pinned and cpu_flags is None and cuda_bf16 is None:
        if pinned not in ("float32", "bfloat16"):
            raise ValueError(
                f"{PRECISION_ENV}={pinned!r} is not float32 or bfloat16 (unset it for auto)"
            )
        dtype = torch.bfloat16 if pinned == "bfloat16" else torch.float32
        return ComputePrecision(dtype, requested, f"{PRECISION_ENV}={pinned}")
    kind = torch.device(device).type
    if kind == "cuda":
        native = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        if native:
            return ComputePrecision(torch.bfloat16, requested, "CUDA device with bfloat16")
        return ComputePrecision(torch.float32, requested, "CUDA device without bfloat16")
    if kind == "cpu":
        found = cpu_bf16_flags() if cpu_flags is None else cpu_flags
        if found:
            return ComputePrecision(torch.bfloat16, requested, "CPU with " + ", ".join(found))
        return ComputePrecision(
            torch.float32, requested, "CPU without native bfloat16 (emulated is slower)"
        )
    return ComputePrecision(torch.float32, requested, f"{kind} device: float32")


@contextmanager
def compute_in(precision: ComputePrecision, model: nn.Module | None = None) -> Iterator[None]:
    """Run the body in `precision` (nothing changes for float32).

    For bfloat16: autocast, and, when `model` is given, bfloat16 copies of its frozen
    matrices for the duration: the weight of every `nn.Linear` not being trained (one that
    does not require grad, or every one when entered under `torch.no_grad()`) except those
    tied to an embedding, and the stacked expert factors of routed linears. On exit the
    original float32 tensors are back, bit for bit. The model's LM head runs in float32.
    """
    device = _device_of(model)
    if precision.dtype != torch.bfloat16:
        yield
        return
    with contextlib.ExitStack() as stack:
        # No autocast cache: it would keep the first bfloat16 copy of a trained parameter
        # for the whole region, stale after the optimiser's first step. The frozen matrices
        # get their copies here, once; trained ones are small and are cast per use.
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False))
        if model is not None:
            head = _output_head(model)
            stack.enter_context(_bf16_frozen_matrices(model, head))
            if head is not None:
                stack.enter_context(_float32_forward(head))
        yield


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    """Compute the body in its operands' own dtypes inside an autocast region (routers in
    float32, the expert mixture in its factors' dtype). Entering autocast costs a few
    microseconds per call, so only when one is on."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _device_of(model: nn.Module | None) -> torch.device:
    if model is None:
        return torch.device("cpu")
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _output_head(model: nn.Module) -> nn.Linear | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, nn.Linear) else None


def _frozen_matrices(model: nn.Module, head: nn.Module | None) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every float32 matrix `compute_in` computes from in bfloat16."""
    training = torch.is_grad_enabled()
    embedded = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    found: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            weight = module.weight
            trained = training and weight.requires_grad
            if weight.dtype == torch.float32 and not trained and id(weight) not in embedded:
                found.append((module, "weight"))
        # Routed linears (phatgoose.routing.layer) stack their experts' factors as buffers.
        for name in ("lora_A", "lora_B"):
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.dtype == torch.float32:
                found.append((module, name))
    return found


@contextmanager
def _bf16_frozen_matrices(model: nn.Module, head: nn.Module | None) -> Iterator[None]:
    originals: list[tuple[nn.Module, str, Tensor]] = []
    try:
        for module, name in _frozen_matrices(model, head):
            if name in module._parameters:
                parameter = module._parameters[name]
                assert parameter is not None
                originals.append((module, name, parameter.data))
                parameter.data = parameter.data.to(torch.bfloat16)
            else:
                buffer = module._buffers[name]
                assert buffer is not None
                originals.append((module, name, buffer))
                module._buffers[name] = buffer.to(torch.bfloat16)
        yield
    finally:
        for module, name, original in reversed(originals):
            if name in module._parameters:
                parameter = module._parameters[name]
                assert parameter is not None
                parameter.data = original
            else:
                module._buffers[name] = original


@contextmanager
def _float32_forward(head: nn.Linear) -> Iterator[None]:
    """`head` computes in float32 inside autocast (its input cast up, its output float32)."""
    instance = vars(head)  # an instance attribute `forward` shadows the class's method
    own = instance.get("forward")
    inner = head.forward
    device_type = head.weight.device.type

    def forward_in_float32(hidden: Tensor) -> Tensor:
        with torch.autocast(device_type, enabled=False):
            out: Tensor = inner(hidden.float())
            return out

    instance["forward"] = forward_in_float32
    try:
        yield
    finally:
        if own is None:
            del instance["forward"]
        else:
            instance["forward"] = own
