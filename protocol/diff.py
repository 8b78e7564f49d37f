"""What changed between two expert packages on the same base model (docs/expert-package.md,
"Diffing two versions").

Per module: the relative change of the full update,
`||s_b B_b A_b - s_a B_a A_a||_F / ||s_a B_a A_a||_F`, computed from the LoRA factors alone
(Gram matrices of at most r x r, never the d x n product), the ranks and scales, the cosine
between the two PHATGOOSE gates, and which tensors are byte for byte the same. Per file:
whether its bytes are the same. And a summary, over the package and per layer.

numpy and safetensors only: the coordinator serves diffs without torch, and the client runs
this same code on local directories. Safetensors files are opened through `safe_open` and read
one module at a time, so memory is bounded by a module's tensors, not by the packages.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import pydantic
from pydantic import BaseModel, Field
from safetensors import safe_open

from protocol.manifest import BaseModelIdentity, ExpertManifest
from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    GATE_SUFFIX,
    MANIFEST_FILE,
    PACKAGE_FILES,
    REQUIRED_FILES,
    ROUTER_FILE,
)
from protocol.peft_format import lora_keys, lora_scale, parse_lora_key
from protocol.validation import file_sha256, package_digest

DIFF_FORMAT_VERSION: Final = 1

Side = Literal["a", "b"]
# A package: a directory, or package file names mapped to where their bytes are.
PackageSource = Path | str | Mapping[str, Path]

# A module's layer is its path up to its first number (`model.layers.3`, `decoder.block.1`),
# as routing statistics group modules per layer (phatgoose.routing.stats.RoutingStats).
_LAYER = re.compile(r"^(.*?\.(\d+))(?:\.|$)")


class DiffError(ValueError):
    """The two packages cannot be compared: a file is missing or unreadable, or the tensors
    of a module do not have the shapes of one base model module."""


class BaseModelMismatch(DiffError):
    """The two packages adapt different base models: their updates live in different
    weight spaces, so no number here would mean anything."""


# --- the result ------------------------------------------------------------------------


class LoraSettings(BaseModel):
    """What `adapter_config.json` says about the scale of every module's update."""

    r: int
    lora_alpha: float
    use_rslora: bool
    scale: float = Field(description="lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora")


class DiffSide(BaseModel):
    """One of the two packages."""

    name: str = Field(description="the manifest's name")
    package_digest: str = Field(description="over the files as given (protocol.package_digest)")
    base_model: BaseModelIdentity
    lora: LoraSettings
    modules: int = Field(description="adapted modules")


class FileDiff(BaseModel):
    filename: str
    sha256_a: str | None = Field(description="null when a has no such file")
    sha256_b: str | None
    size_a: int | None
    size_b: int | None
    identical: bool = Field(description="both have the file, with the same bytes")


class TensorIdentity(BaseModel):
    """Per tensor of a module: byte-identical (same dtype, shape and little-endian bytes);
    null where either package lacks the tensor."""

    lora_a: bool | None = None
    lora_b: bool | None = None
    gate: bool | None = None


ModuleStatus = Literal["changed", "unchanged", "added", "removed"]


class ModuleDiff(BaseModel):
    path: str = Field(description="the module's path in the base model")
    layer: str = Field(description="its layer, e.g. model.layers.3 (the path itself if none)")
    present: Literal["a", "b", "both"]
    status: ModuleStatus = Field(
        description="unchanged: lora_A, lora_B and the gate byte-identical and the same scale"
    )
    rank_a: int | None
    rank_b: int | None
    scale_a: float | None
    scale_b: float | None
    norm_a: float | None = Field(description="||s_a B_a A_a||_F")
    norm_b: float | None = Field(description="||s_b B_b A_b||_F")
    relative_change: float | None = Field(
        description="||s_b B_b A_b - s_a B_a A_a||_F / ||s_a B_a A_a||_F; null when the module "
        "is not in both, or a's update is zero while b's is not"
    )
    gate_cosine: float | None = Field(
        description="cosine of the two gates; null if either lacks one"
    )
    identical: TensorIdentity


class LayerDiff(BaseModel):
    layer: str = Field(description="e.g. model.layers.3")
    index: int | None = Field(description="the layer's number; null for a module outside layers")
    modules: int = Field(description="modules of the layer in a or b")
    changed: int
    added: int
    removed: int
    mean_relative_change: float | None = Field(description="over its modules in both")
    max_relative_change: float | None
    mean_gate_cosine: float | None


class DiffSummary(BaseModel):
    modules_changed: int
    modules_unchanged: int
    modules_added: int
    modules_removed: int
    lora_identical_modules: int = Field(
        description="modules in both whose lora_A and lora_B are byte-identical"
    )
    gate_identical_modules: int = Field(description="modules in both whose gate is byte-identical")
    median_relative_change: float | None = Field(description="over the modules in both")
    max_relative_change: float | None
    max_relative_change_module: str | None
    mean_gate_cosine: float | None = Field(description="over the modules in both with gates")


class PackageDiff(BaseModel):
    """Everything `diff_packages` finds; JSON as it is (`model_dump(mode="json")`)."""

    format_version: Literal[1] = DIFF_FORMAT_VERSION
    a: DiffSide
    b: DiffSide
    summary: DiffSummary
    files: list[FileDiff]
    layers: list[LayerDiff] = Field(description="in the order of their modules")
    modules: list[ModuleDiff] = Field(description="every module of a or b, layer by layer")


# --- the factor algebra ----------------------------------------------------------------


def lora_inner(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> float:
    """The Frobenius inner product <B1 A1, B2 A2> without forming either d x n product.

    <B1 A1, B2 A2> = trace(A1^T B1^T B2 A2) = trace((B1^T B2)(A2 A1^T)), an r1 x r2 matrix times
    an r2 x r1 one; the trace of M N is the sum of M * N^T, and N^T = A1 A2^T. In float64:
    O(r1 r2 (d + n)) operations. With (a2, b2) = (a1, b1) it is ||B1 A1||_F^2.
    """
    a1, b1, a2, b2 = (np.asarray(x, dtype=np.float64) for x in (a1, b1, a2, b2))
    return float(np.sum((b1.T @ b2) * (a1 @ a2.T)))


@dataclass(frozen=True)
class UpdateChange:
    norm_a: float  # ||s_a B_a A_a||_F
    norm_b: float
    difference: float  # ||s_b B_b A_b - s_a B_a A_a||_F

    @property
    def relative(self) -> float | None:
        """difference / norm_a; None when a's update is zero and b's differs from it."""
        if self.norm_a > 0:
            return self.difference / self.norm_a
        return 0.0 if self.difference == 0 else None


def update_change(
    a_a: np.ndarray,
    b_a: np.ndarray,
    scale_a: float,
    a_b: np.ndarray,
    b_b: np.ndarray,
    scale_b: float,
) -> UpdateChange:
    """The norms of two LoRA updates `scale * B @ A` and of their difference, from factors.

    ||s_b W_b - s_a W_a||^2 = s_a^2 ||W_a||^2 + s_b^2 ||W_b||^2 - 2 s_a s_b <W_a, W_b>. The three
    terms are large and nearly cancel for similar updates: rounding leaves an error of about
    1e-16 of the squares, so the result is clamped at 0 before the square root, and a
    relative change below about 1e-8 is indistinguishable from none (`diff_packages` gives
    exactly 0 for byte-identical factors with the same scale).
    """
    squared_a = lora_inner(a_a, b_a, a_a, b_a)
    squared_b = lora_inner(a_b, b_b, a_b, b_b)
    cross = lora_inner(a_a, b_a, a_b, b_b)
    difference = (
        (scale_a * scale_a) * squared_a
        + (scale_b * scale_b) * squared_b
        - 2.0 * (scale_a * scale_b) * cross
    )
    return UpdateChange(
        norm_a=abs(scale_a) * math.sqrt(max(squared_a, 0.0)),
        norm_b=abs(scale_b) * math.sqrt(max(squared_b, 0.0)),
        difference=math.sqrt(max(difference, 0.0)),
    )


def gate_cosine(gate_a: np.ndarray, gate_b: np.ndarray) -> float | None:
    """The cosine between two gate vectors, in float64; None if either is zero."""
    a = np.asarray(gate_a, dtype=np.float64)
    b = np.asarray(gate_b, dtype=np.float64)
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    if norms == 0:
        return None
    return min(1.0, max(-1.0, float(a @ b) / norms))


def layer_of(path: str) -> tuple[str, int | None]:
    """`(label, index)` of a module's layer: `model.layers.3.mlp.up_proj` ->
    `("model.layers.3", 3)`; a path without a number is its own label, with no index."""
    match = _LAYER.match(path)
    if match is None:
        return path, None
    return match.group(1), int(match.group(2))


def module_sort_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Numeric parts compare as numbers, so layer 2 comes before layer 10."""
    return tuple(
        (0, int(part)) if part.isascii() and part.isdigit() else (1, part)
        for part in path.split(".")
    )


# --- reading a package -----------------------------------------------------------------


def package_files(source: PackageSource, side: str = "package") -> dict[str, Path]:
    """The package files of `source`: a directory (entries that are not package files, such
    as PEFT's README.md, are left out) or a mapping of file names to paths. Raises
    `DiffError` when a required file is missing."""
    if isinstance(source, Mapping):
        files = {name: Path(path) for name, path in source.items() if name in PACKAGE_FILES}
        where = f"{side} (the files given)"
    else:
        directory = Path(source)
        if not directory.is_dir():
            raise DiffError(f"{side}: {directory} is not a directory; expected a package directory")
        files = {name: directory / name for name in PACKAGE_FILES if (directory / name).is_file()}
        where = f"{side} ({directory})"
    missing = [name for name in REQUIRED_FILES if name not in files or not files[name].is_file()]
    if missing:
        raise DiffError(
            f"{where} is not an expert package: {', '.join(missing)} missing; expected the "
            f"files {', '.join(REQUIRED_FILES)}"
        )
    return files


@dataclass(frozen=True)
class _Tensor:
    values: np.ndarray  # float64
    identity: tuple[str, tuple[int, ...], str]  # safetensors dtype, shape, sha256 of LE bytes
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Module:
    lora_a: _Tensor
    lora_b: _Tensor
    gate: _Tensor | None


class _Package:
    """One side's manifest, scale, file hashes and open safetensors files."""

    def __init__(self, side: Side, source: PackageSource, stack: ExitStack) -> None:
        self.side = side
        self.files = package_files(source, side)
        self.manifest = _read_manifest(side, self.files[MANIFEST_FILE])
        self.lora = _read_lora_settings(side, self.files[ADAPTER_CONFIG_FILE])
        self.sha256 = {name: file_sha256(path) for name, path in self.files.items()}
        self.sizes = {name: path.stat().st_size for name, path in self.files.items()}
        self.adapter = stack.enter_context(
            _open_safetensors(side, ADAPTER_WEIGHTS_FILE, self.files[ADAPTER_WEIGHTS_FILE])
        )
        self.router = stack.enter_context(
            _open_safetensors(side, ROUTER_FILE, self.files[ROUTER_FILE])
        )
        self.module_paths = _lora_module_paths(side, self.adapter)
        # safe_open handles are not iterable: their names come from keys().
        router_names: list[str] = list(self.router.keys())
        self.gate_paths = {
            key.removesuffix(GATE_SUFFIX) for key in router_names if key.endswith(GATE_SUFFIX)
        }

    def describe(self) -> DiffSide:
        return DiffSide(
            name=self.manifest.name,
            package_digest=package_digest(self.sha256),
            base_model=self.manifest.base_model,
            lora=self.lora,
            modules=len(self.module_paths),
        )

    def module(self, path: str) -> _Module:
        """A module's tensors, with its shapes checked against each other and the config."""
        key_a, key_b = lora_keys(path)
        lora_a = _read_tensor(self.side, self.adapter, ADAPTER_WEIGHTS_FILE, key_a)
        lora_b = _read_tensor(self.side, self.adapter, ADAPTER_WEIGHTS_FILE, key_b)
        if len(lora_a.shape) != 2 or len(lora_b.shape) != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise DiffError(
                f"{self.side}: module '{path}' has lora_A of shape {list(lora_a.shape)} and "
                f"lora_B of shape {list(lora_b.shape)}; expected [r, in_features] and "
                "[out_features, r] with the same r"
            )
        if lora_a.shape[0] != self.lora.r:
            raise DiffError(
                f"{self.side}: module '{path}' has rank {lora_a.shape[0]} but "
                f"{ADAPTER_CONFIG_FILE} says r = {self.lora.r}; expected every module at r"
            )
        gate = None
        if path in self.gate_paths:
            gate = _read_tensor(self.side, self.router, ROUTER_FILE, path + GATE_SUFFIX)
            if gate.shape != (lora_a.shape[1],):
                raise DiffError(
                    f"{self.side}: the gate of module '{path}' has shape {list(gate.shape)}; "
                    f"expected [{lora_a.shape[1]}] (the in_features of its lora_A)"
                )
        return _Module(lora_a, lora_b, gate)


def _read_manifest(side: Side, path: Path) -> ExpertManifest:
    try:
        return ExpertManifest.model_validate_json(path.read_bytes())
    except (OSError, pydantic.ValidationError) as error:
        raise DiffError(
            f"{side}: {MANIFEST_FILE} is not a readable manifest ({error}); expected an "
            "ExpertManifest (docs/expert-package.md)"
        ) from error


def _read_lora_settings(side: Side, path: Path) -> LoraSettings:
    """r, lora_alpha and use_rslora, checked as admission checks them (per-module ranks or
    alphas are refused there too: every router treats a module as one (A, B, scale))."""

    def refuse(detail: str, expected: str) -> DiffError:
        return DiffError(f"{side}: {ADAPTER_CONFIG_FILE}: {detail}; expected {expected}")

    try:
        config: Any = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise refuse(f"not readable JSON ({error})", "a JSON object") from error
    if not isinstance(config, dict):
        raise refuse(f"a JSON {type(config).__name__}", "a JSON object")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise refuse(f"r is {json.dumps(rank)}", "a positive integer")
    alpha = config.get("lora_alpha")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise refuse(f"lora_alpha is {json.dumps(alpha)}", "a positive number")
    use_rslora = config.get("use_rslora", False)
    if type(use_rslora) is not bool:
        raise refuse(f"use_rslora is {json.dumps(use_rslora)}", "true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise refuse(f"{key} is set", f"no {key} (one rank and alpha for every module)")
    return LoraSettings(
        r=rank,
        lora_alpha=float(alpha),
        use_rslora=use_rslora,
        scale=lora_scale(rank, float(alpha), use_rslora),
    )


@contextmanager
def _open_safetensors(side: Side, name: str, path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as error:  # the Rust parser raises SafetensorError, others on odd input
        raise DiffError(f"{side}: {name} is not a valid safetensors file ({error})") from error
    with handle as f:
        yield f


def _lora_module_paths(side: Side, adapter: Any) -> set[str]:
    found: dict[str, set[str]] = {}
    names: list[str] = list(adapter.keys())
    for key in names:
        parsed = parse_lora_key(key)
        if parsed is None:
            raise DiffError(
                f"{side}: {ADAPTER_WEIGHTS_FILE} [{key}] is not a LoRA tensor; expected only "
                "'base_model.model.<module path>.lora_A.weight' and '...lora_B.weight'"
            )
        path, matrix = parsed
        found.setdefault(path, set()).add(matrix)
    for path, matrices in found.items():
        if matrices != {"A", "B"}:
            (present,) = matrices
            missing = "B" if present == "A" else "A"
            raise DiffError(
                f"{side}: module '{path}' has lora_{present} but no lora_{missing} in "
                f"{ADAPTER_WEIGHTS_FILE}; expected both"
            )
    return set(found)


def _read_tensor(side: Side, f: Any, name: str, key: str) -> _Tensor:
    """A tensor as float64, and its identity: safetensors dtype, shape and the sha256 of its
    bytes in little-endian order (what the file holds), so that identity never depends on
    how floats compare (-0.0 == 0.0, NaN != NaN)."""
    info = f.get_slice(key)
    dtype, shape = str(info.get_dtype()), tuple(int(s) for s in info.get_shape())
    try:
        array = np.asarray(f.get_tensor(key))
    except Exception as error:  # numpy has no bfloat16, for one
        raise DiffError(
            f"{side}: {name} [{key}]: numpy cannot read dtype {dtype} ({error}); expected "
            "float32 or float16 (convert bfloat16 to float32 before saving)"
        ) from error
    little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    digest = hashlib.sha256(little_endian.tobytes()).hexdigest()
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        bad = values.size - int(np.count_nonzero(np.isfinite(values)))
        raise DiffError(
            f"{side}: {name} [{key}]: {bad} of {values.size} values are NaN or infinite; "
            "expected finite values"
        )
    return _Tensor(values, (dtype, shape, digest), shape)


# --- the diff --------------------------------------------------------------------------


def diff_packages(a: PackageSource, b: PackageSource) -> PackageDiff:
    """Compare package `b` with package `a` (the reference: relative changes are relative
    to a's updates). Each is a directory or a mapping of package file names to paths.

    Raises `BaseModelMismatch` when the manifests name base models with different weight
    fingerprints, and `DiffError` when a package is unreadable or a module's tensors do not
    have the shapes of one base model module in both.
    """
    with ExitStack() as stack:
        side_a = _Package("a", a, stack)
        side_b = _Package("b", b, stack)
        _check_same_base(side_a.manifest.base_model, side_b.manifest.base_model)
        paths = sorted(side_a.module_paths | side_b.module_paths, key=module_sort_key)
        modules = [_module_diff(path, side_a, side_b) for path in paths]
    return PackageDiff(
        a=side_a.describe(),
        b=side_b.describe(),
        summary=_summary(modules),
        files=_file_diffs(side_a, side_b),
        layers=_layer_diffs(modules),
        modules=modules,
    )


def _check_same_base(a: BaseModelIdentity, b: BaseModelIdentity) -> None:
    # The fingerprint is the identity of the weights (the name is a label, and one base may
    # be known by another name elsewhere, as admission also trusts only the fingerprint).
    if a.fingerprint != b.fingerprint:
        raise BaseModelMismatch(
            f"a is on base model '{a.name}' ({a.fingerprint}) but b is on '{b.name}' "
            f"({b.fingerprint}); expected two experts on the same base model (same weights)"
        )


def _same(x: _Tensor | None, y: _Tensor | None) -> bool | None:
    return None if x is None or y is None else x.identity == y.identity


def _module_diff(path: str, side_a: _Package, side_b: _Package) -> ModuleDiff:
    layer, _ = layer_of(path)
    in_a, in_b = path in side_a.module_paths, path in side_b.module_paths
    if not (in_a and in_b):
        only = side_a if in_a else side_b
        module = only.module(path)
        norm = math.sqrt(max(lora_inner(*_factors(module), *_factors(module)), 0.0))
        rank, scale, norm = module.lora_a.shape[0], only.lora.scale, abs(only.lora.scale) * norm
        return ModuleDiff(
            path=path,
            layer=layer,
            present="a" if in_a else "b",
            status="removed" if in_a else "added",
            rank_a=rank if in_a else None,
            rank_b=None if in_a else rank,
            scale_a=scale if in_a else None,
            scale_b=None if in_a else scale,
            norm_a=norm if in_a else None,
            norm_b=None if in_a else norm,
            relative_change=None,
            gate_cosine=None,
            identical=TensorIdentity(),
        )

    module_a, module_b = side_a.module(path), side_b.module(path)
    _check_same_module(path, module_a, module_b)
    identical = TensorIdentity(
        lora_a=_same(module_a.lora_a, module_b.lora_a),
        lora_b=_same(module_a.lora_b, module_b.lora_b),
        gate=_same(module_a.gate, module_b.gate),
    )
    same_update = bool(identical.lora_a and identical.lora_b) and (
        side_a.lora.scale == side_b.lora.scale
    )
    change = update_change(
        *_factors(module_a), side_a.lora.scale, *_factors(module_b), side_b.lora.scale
    )
    if same_update:  # the same bytes and scale are the same update: no rounding noise
        change = UpdateChange(change.norm_a, change.norm_a, 0.0)
    gates_same = identical.gate or (module_a.gate is None and module_b.gate is None)
    unchanged = same_update and gates_same
    cosine = (
        gate_cosine(module_a.gate.values, module_b.gate.values)
        if module_a.gate is not None and module_b.gate is not None
        else None
    )
    return ModuleDiff(
        path=path,
        layer=layer,
        present="both",
        status="unchanged" if unchanged else "changed",
        rank_a=module_a.lora_a.shape[0],
        rank_b=module_b.lora_a.shape[0],
        scale_a=side_a.lora.scale,
        scale_b=side_b.lora.scale,
        norm_a=change.norm_a,
        norm_b=change.norm_b,
        relative_change=change.relative,
        gate_cosine=cosine,
        identical=identical,
    )


def _factors(module: _Module) -> tuple[np.ndarray, np.ndarray]:
    return module.lora_a.values, module.lora_b.values


def _check_same_module(path: str, a: _Module, b: _Module) -> None:
    """Same base model module: the same in_features (A's columns) and out_features (B's rows);
    the ranks may differ."""
    if a.lora_a.shape[1] != b.lora_a.shape[1] or a.lora_b.shape[0] != b.lora_b.shape[0]:
        raise DiffError(
            f"module '{path}' has lora_A {list(a.lora_a.shape)} and lora_B "
            f"{list(a.lora_b.shape)} in a but lora_A {list(b.lora_a.shape)} and lora_B "
            f"{list(b.lora_b.shape)} in b; expected the same in_features and out_features "
            "(one base model module)"
        )


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summary(modules: list[ModuleDiff]) -> DiffSummary:
    shared = [m for m in modules if m.present == "both"]
    changes = [(m.relative_change, m.path) for m in shared if m.relative_change is not None]
    largest = max(changes, default=None)
    return DiffSummary(
        modules_changed=sum(m.status == "changed" for m in modules),
        modules_unchanged=sum(m.status == "unchanged" for m in modules),
        modules_added=sum(m.status == "added" for m in modules),
        modules_removed=sum(m.status == "removed" for m in modules),
        lora_identical_modules=sum(bool(m.identical.lora_a and m.identical.lora_b) for m in shared),
        gate_identical_modules=sum(bool(m.identical.gate) for m in shared),
        median_relative_change=float(np.median([c for c, _ in changes])) if changes else None,
        max_relative_change=largest[0] if largest else None,
        max_relative_change_module=largest[1] if largest else None,
        mean_gate_cosine=_mean([m.gate_cosine for m in shared if m.gate_cosine is not None]),
    )


def _layer_diffs(modules: list[ModuleDiff]) -> list[LayerDiff]:
    by_layer: dict[str, list[ModuleDiff]] = {}
    for m in modules:
        by_layer.setdefault(m.layer, []).append(m)
    layers = []
    for label, members in by_layer.items():
        changes = [m.relative_change for m in members if m.relative_change is not None]
        cosines = [m.gate_cosine for m in members if m.gate_cosine is not None]
        layers.append(
            LayerDiff(
                layer=label,
                index=layer_of(members[0].path)[1],
                modules=len(members),
                changed=sum(m.status == "changed" for m in members),
                added=sum(m.status == "added" for m in members),
                removed=sum(m.status == "removed" for m in members),
                mean_relative_change=_mean(changes),
                max_relative_change=max(changes) if changes else None,
                mean_gate_cosine=_mean(cosines),
            )
        )
    return layers


def _file_diffs(side_a: _Package, side_b: _Package) -> list[FileDiff]:
    names = [n for n in PACKAGE_FILES if n in side_a.files or n in side_b.files]
    return [
        FileDiff(
            filename=name,
            sha256_a=side_a.sha256.get(name),
            sha256_b=side_b.sha256.get(name),
            size_a=side_a.sizes.get(name),
            size_b=side_b.sizes.get(name),
            identical=name in side_a.sha256 and side_a.sha256.get(name) == side_b.sha256.get(name),
        )
        for name in sorted(names)
    ]
