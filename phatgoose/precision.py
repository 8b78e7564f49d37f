"""Compute precision: the one place that decides whether models compute in bfloat16.

`auto` computes in bfloat16 where the hardware multiplies bfloat16 matrices natively (a CPU
with AMX-BF16 or AVX512-BF16, or a CUDA device that supports bfloat16) and in float32
elsewhere (emulated bfloat16 is reported slower than float32 on CPUs without those units;
not yet measured here). `float32` and `bfloat16` override the decision. Parameters stay
float32 either way (the expert package format does not change); bfloat16 compute is
`torch.autocast`, so matrix products run in bfloat16 while losses and log-probabilities
are accumulated in float32 by the code that computes them.

Status (issue 15): this module and its tests have landed; wiring it into training,
scoring, the client, the worker, the benchmarks and the demo, and recording the precision
in what they write, is the next step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

# /proc/cpuinfo flags of native bfloat16 matrix arithmetic (Intel AMX, Intel and AMD AVX512).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class ComputePrecision:
    """What was decided, and why (recorded next to results)."""

    dtype: torch.dtype
    requested: str
    reason: str

    @property
    def name(self) -> str:
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
    """The precision to compute in on `device`. `cpu_flags` and `cuda_bf16` stand in for
    the hardware's answers (tests); by default they are detected."""
    if requested not in PRECISIONS:
        raise ValueError(
            f"precision {requested!r} is not one of {', '.join(PRECISIONS)} "
            "(auto: bfloat16 where the hardware has native bfloat16 matrix units)"
        )
    if requested != "auto":
        dtype = torch.bfloat16 if requested == "bfloat16" else torch.float32
        return ComputePrecision(dtype, requested, "asked for")
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
def compute_in(precision: ComputePrecision, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the body's matrix products in `precision` (autocast for bfloat16; nothing
    changes for float32). Parameters and their gradients stay float32."""
    kind = torch.device(device).type
    enabled = precision.dtype == torch.bfloat16
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=enabled):
        yield
