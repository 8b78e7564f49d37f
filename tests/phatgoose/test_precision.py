"""The precision policy: which hardware gets bfloat16 under `auto`, explicit overrides,
and what computing in each precision does to a linear layer and its gradients."""

import pytest
import torch
from torch import nn

from phatgoose.precision import (
    ComputePrecision,
    compute_in,
    cpu_bf16_flags,
    resolve_precision,
)

INTEL_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_tile amx_bf16 avx512_bf16\n"
AMD_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert cpu_bf16_flags(INTEL_AMX) == ("amx_bf16", "avx512_bf16")
    assert cpu_bf16_flags(AMD_ZEN4) == ("avx512_bf16",)
    assert cpu_bf16_flags(OLD_XEON) == ()
    assert cpu_bf16_flags("") == ()  # no /proc/cpuinfo (macOS, Windows)


@pytest.mark.parametrize(
    ("cpuinfo", "dtype"),
    [(INTEL_AMX, torch.bfloat16), (AMD_ZEN4, torch.bfloat16), (OLD_XEON, torch.float32)],
)
def test_auto_on_a_cpu_follows_its_native_bf16_units(cpuinfo, dtype):
    decided = resolve_precision("auto", "cpu", cpu_flags=cpu_bf16_flags(cpuinfo))
    assert decided.dtype == dtype
    assert decided.record()["requested"] == "auto"
    assert decided.reason.startswith("CPU with ") == (dtype == torch.bfloat16)


@pytest.mark.parametrize(("native", "dtype"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_follows_the_device(native, dtype):
    assert resolve_precision("auto", "cuda", cuda_bf16=native).dtype == dtype


@pytest.mark.parametrize(
    ("asked", "dtype"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_an_explicit_precision_overrides_the_hardware(asked, dtype):
    for flags in ((), ("amx_bf16",)):
        decided = resolve_precision(asked, "cpu", cpu_flags=flags)
        assert decided.dtype == dtype
        assert decided.record() == {"precision": asked, "requested": asked, "reason": "asked for"}


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'fp16' is not one of auto, float32, bfloat16"):
        resolve_precision("fp16")


def _linear_step(precision: ComputePrecision):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs = torch.randn(4, 16)
    with compute_in(precision):
        out = layer(inputs)
    loss = out.float().pow(2).mean()
    loss.backward()
    return out, layer


def test_bfloat16_compute_keeps_float32_parameters_and_gradients():
    out, layer = _linear_step(resolve_precision("bfloat16"))
    assert out.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_float32_compute_is_plain_float32_and_bf16_stays_within_its_rounding():
    reference, _ = _linear_step(resolve_precision("float32"))
    low, _ = _linear_step(resolve_precision("bfloat16"))
    assert reference.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: relative error of a 16-term dot product ~ 1e-2.
    assert torch.allclose(low.float(), reference, rtol=3e-2, atol=3e-2)
    assert not torch.equal(low.float(), reference)
