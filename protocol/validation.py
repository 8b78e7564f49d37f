"""Admission checks for an expert package: what every upload must pass before it is stored.

One function, `validate_package`, serves the HTTP upload, the Flower reply and
`phatgoose client inspect` alike. Checks run in a fixed order and the first failure raises
`PackageRejected`, which names the file, the check, the tensor and what was expected.

Safetensors files are read only through the `safetensors` package (nothing is unpickled,
nothing is parsed by hand) and tensor by tensor, so memory stays bounded by the largest
tensor rather than the package. The contract is documented in docs/expert-package.md.
"""

import hashlib
import json
import math
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from safetensors import safe_open

from protocol.base_model import BaseModelSpec, LinearModuleSpec
from protocol.limits import DEFAULT_LIMITS, AdmissionLimits
from protocol.manifest import (
    FORMAT_VERSION,
    MAX_IDENTIFIER_CHARS,
    MAX_SAFE_INTEGER,
    MAX_TARGET_MODULES,
    ExpertManifest,
)
from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AVERAGE_ACTIVATION_SUFFIX,
    GATE_SUFFIX,
    LORA_DTYPES,
    MANIFEST_FILE,
    PACKAGE_FILES,
    REQUIRED_FILES,
    RETRIEVAL_EMBEDDINGS_KEY,
    RETRIEVAL_FILE,
    ROUTER_FILE,
    VECTOR_DTYPE,
)
from protocol.peft_format import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_KEY_PREFIX,
    lora_keys,
    lora_scale,
    target_module_matcher,
)
from protocol.privacy import EPSILON_TOLERANCE, accounted_epsilon

# How messages name safetensors dtypes.
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}

# adapter_config.json keys that do not change what the saved adapter computes on top of the
# base weights (bookkeeping, training-time dropout, initialisations that leave the base
# untouched). `r`, `lora_alpha`, `use_rslora`, `target_modules`, `exclude_modules` and
# `task_type` are checked on their own. Every other key must be off (null, false, empty or
# "none"): an unknown option from a newer PEFT is rejected rather than silently ignored.
# None of these keys is kept: the stored config is rewritten from the checked values
# (`_canonical_config`), because some of them make PEFT import code (`auto_mapping`,
# `megatron_core`) or fetch files (`base_model_name_or_path`, `revision`) when loading.
_INERT_CONFIG_KEYS = frozenset(
    {
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "init_lora_weights",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "ensure_weight_tying",
    }
)
# PiSSA, OLoRA, LoftQ and CorDA initialisations rewrite the base weights, so an adapter
# trained with them is not an update of the published base model.
_BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal")
_TASK_TYPES = {False: "CAUSAL_LM", True: "SEQ_2_SEQ_LM"}
# What the stored adapter_config.json says about every option the platform does not use:
# written out (not left to PEFT's defaults) so that a later PEFT with other defaults still
# loads a plain LoRA update.
_CANONICAL_OFF: dict[str, Any] = {
    "alpha_pattern": {},
    "bias": "none",
    "fan_in_fan_out": False,
    "init_lora_weights": True,  # the saved weights replace the initialisation at load time
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "use_dora": False,
}

_HASH_CHUNK = 1 << 20


class PackageRejected(Exception):
    """An expert package failed an admission check; the body of the 4xx reply."""

    def __init__(
        self,
        check: str,
        file: str | None,
        detail: str,
        *,
        tensor: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.check = check
        self.file = file
        self.tensor = tensor
        self.expected = expected
        where = file or "package"
        if tensor is not None:
            where += f" [{tensor}]"
        self.message = f"{where}: {detail}"
        if expected is not None:
            self.message += f"; expected {expected}"
        super().__init__(self.message)

    def to_dict(self) -> dict[str, str | None]:
        return {
            "error": "package_rejected",
            "check": self.check,
            "file": self.file,
            "tensor": self.tensor,
            "expected": self.expected,
            "message": self.message,
        }


@dataclass(frozen=True)
class ValidatedPackage:
    """What admission learned about an accepted package."""

    manifest: ExpertManifest
    adapter_config: dict[str, Any]  # canonical: what is stored and served (_canonical_config)
    module_paths: tuple[str, ...]  # adapted modules, paths in the base model, in its order
    rank: int
    lora_alpha: float
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    file_sha256: dict[str, str]  # file name -> hex digest
    file_bytes: dict[str, int]
    digest: str  # "sha256:<hex>" over the files as stored, see package_digest
    total_bytes: int
    has_average_activation: bool
    has_retrieval: bool
    retrieval_examples: int

    # adapter_config.json as stored: the canonical rewrite of the uploaded one.
    # `file_sha256`, `file_bytes`, `digest` and `total_bytes` describe these bytes.
    canonical_adapter_config: bytes


@dataclass(frozen=True)
class _LoraLayout:
    config: dict[str, Any]  # canonical
    target_modules: tuple[str, ...]  # sorted, without duplicates
    rank: int
    lora_alpha: float
    scale: float
    modules: tuple[LinearModuleSpec, ...]


def validate_package(
    files: Mapping[str, Path],
    base: BaseModelSpec,
    limits: AdmissionLimits = DEFAULT_LIMITS,
    *,
    namespace: str | None = None,
) -> ValidatedPackage:
    """Check every file of a package against `base` and `limits`; raise `PackageRejected`.

    `files` maps package file names (`expert.json`, ...) to where their bytes are on disk.
    `namespace`, when given, is the uploader's: the manifest name must be in it or bare.
    """
    paths = _check_file_names(files)
    sizes = _check_sizes(paths, limits)
    manifest = _check_manifest(paths[MANIFEST_FILE], base, namespace)
    layout = _check_adapter_config(paths[ADAPTER_CONFIG_FILE], base, limits)
    _check_manifest_matches_config(manifest, layout)

    has_retrieval = RETRIEVAL_FILE in paths
    with ExitStack() as stack:
        adapter = stack.enter_context(
            _open_safetensors(ADAPTER_WEIGHTS_FILE, paths[ADAPTER_WEIGHTS_FILE], limits)
        )
        router = stack.enter_context(_open_safetensors(ROUTER_FILE, paths[ROUTER_FILE], limits))
        retrieval = (
            stack.enter_context(_open_safetensors(RETRIEVAL_FILE, paths[RETRIEVAL_FILE], limits))
            if has_retrieval
            else None
        )
        # Names and headers first: they cost nothing to read, unlike the tensors.
        _check_adapter_names(adapter, layout.modules)
        has_average_activation = _check_router_names(router, layout.modules)
        if retrieval is not None:
            _check_retrieval_names(retrieval)
        _check_manifest_flags(manifest, has_average_activation, has_retrieval)
        _check_privacy(manifest)

        _check_adapter_headers(adapter, layout)
        _check_router_headers(router, layout.modules, has_average_activation)
        examples = _check_retrieval_header(retrieval, limits) if retrieval is not None else 0

        _check_adapter_values(adapter, layout, limits)
        _check_router_values(router, layout.modules, has_average_activation, limits)
        if retrieval is not None:
            _check_retrieval_values(retrieval)

    canonical = canonical_json_bytes(layout.config)
    hashes = {
        name: file_sha256(path) for name, path in paths.items() if name != ADAPTER_CONFIG_FILE
    }
    hashes[ADAPTER_CONFIG_FILE] = hashlib.sha256(canonical).hexdigest()
    sizes[ADAPTER_CONFIG_FILE] = len(canonical)
    return ValidatedPackage(
        manifest=manifest,
        adapter_config=layout.config,
        module_paths=tuple(m.path for m in layout.modules),
        rank=layout.rank,
        lora_alpha=layout.lora_alpha,
        scale=layout.scale,
        file_sha256=hashes,
        file_bytes=sizes,
        digest=package_digest(hashes),
        total_bytes=sum(sizes.values()),
        has_average_activation=has_average_activation,
        has_retrieval=has_retrieval,
        retrieval_examples=examples,
        canonical_adapter_config=canonical,
    )


@contextmanager
def stored_files(
    validated: ValidatedPackage, files: Mapping[str, Path]
) -> Iterator[dict[str, Path]]:
    """The package files as they are stored: `files`, with the adapter config replaced by
    its canonical rewrite (in a temporary file that lasts as long as the context)."""
    with tempfile.TemporaryDirectory(prefix="phatgoose-canonical-") as folder:
        config = Path(folder) / ADAPTER_CONFIG_FILE
        config.write_bytes(validated.canonical_adapter_config)
        yield {**{name: Path(path) for name, path in files.items()}, ADAPTER_CONFIG_FILE: config}


def canonical_json_bytes(data: Any) -> bytes:
    """One byte string per JSON value: sorted keys, two-space indent, UTF-8, newline."""
    return (
        json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode()


def validate_directory(
    path: Path,
    base: BaseModelSpec,
    limits: AdmissionLimits = DEFAULT_LIMITS,
    *,
    namespace: str | None = None,
) -> ValidatedPackage:
    """Validate a package written to a directory: every entry in it is a package file."""
    path = Path(path)
    if not path.is_dir():
        raise PackageRejected(
            "missing_file", None, f"{path} is not a directory", expected="a package directory"
        )
    return validate_package(
        {entry.name: entry for entry in path.iterdir()}, base, limits, namespace=namespace
    )


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def package_digest(file_sha256: Mapping[str, str]) -> str:
    """`sha256:<hex>` of the sorted lines `<file name>:<file sha256 hex>\\n`.

    Identifies a package by its content whatever order or route its files came in.
    """
    lines = "".join(f"{name}:{file_sha256[name]}\n" for name in sorted(file_sha256))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def lora_update_norm(lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> float:
    """||scale * B @ A||_F without forming the d x n product.

    ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)), two r x r Gram matrices; both are
    symmetric, so the trace of their product is the sum of their elementwise product.
    """
    a = np.asarray(lora_a, dtype=np.float64)
    b = np.asarray(lora_b, dtype=np.float64)
    squared = float(np.sum((b.T @ b) * (a @ a.T)))
    return abs(scale) * math.sqrt(max(squared, 0.0))


def adapted_modules(
    target_modules: list[str], base: BaseModelSpec, exclude_modules: list[str] | None = None
) -> tuple[LinearModuleSpec, ...]:
    """The base model's linear modules PEFT adapts for these names, in the model's order
    (`protocol.peft_format.matches_target_modules`). Names are looked up in a set, so the
    cost is linear in the number of modules and names, not their product."""
    targeted = target_module_matcher(target_modules)
    excluded = target_module_matcher(exclude_modules or [])
    return tuple(m for m in base.linear_modules if targeted(m.path) and not excluded(m.path))


# --- files and sizes -------------------------------------------------------------------


def _check_file_names(files: Mapping[str, Path]) -> dict[str, Path]:
    for name in REQUIRED_FILES:
        if name not in files:
            raise PackageRejected(
                "missing_file",
                name,
                "the package has no such file",
                expected=f"the files {', '.join(REQUIRED_FILES)}",
            )
    for name in sorted(files):
        if name not in PACKAGE_FILES:
            raise PackageRejected(
                "unknown_file",
                name,
                "not a file of an expert package",
                expected=f"only {', '.join(PACKAGE_FILES)}",
            )
    paths = {name: Path(files[name]) for name in PACKAGE_FILES if name in files}
    for name, path in paths.items():
        if not path.is_file():
            raise PackageRejected(
                "missing_file", name, f"{path} is not a readable file", expected="a regular file"
            )
    return paths


def _check_sizes(paths: dict[str, Path], limits: AdmissionLimits) -> dict[str, int]:
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    for name, size in sizes.items():
        if size > limits.max_file_bytes(name):
            raise PackageRejected(
                "too_large",
                name,
                f"the file is {size} bytes",
                expected=f"at most {limits.max_file_bytes(name)} bytes",
            )
    total = sum(sizes.values())
    if total > limits.max_total_bytes:
        raise PackageRejected(
            "too_large",
            None,
            f"the files total {total} bytes",
            expected=f"at most {limits.max_total_bytes} bytes",
        )
    return sizes


# --- JSON files ------------------------------------------------------------------------


def _load_json(path: Path, name: str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys (parsers disagree on those)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found = dict(pairs)  # linear: an object with many keys must not cost quadratic time
        if len(found) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise ValueError(f"duplicate key {key!r}")
                seen.add(key)
        return found

    def no_constants(token: str) -> Any:
        raise ValueError(f"{token} is not JSON")

    # `1e999` is JSON syntax but overflows to infinity, which no JSON writer (nor SQLite's
    # JSON functions) accepts back; integers past 2^53 lose precision in most readers.
    def finite_float(token: str) -> float:
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"the number {token[:40]} overflows a double")
        return value

    def safe_int(token: str) -> int:
        value = int(token)
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError(f"the integer {token[:40]} is beyond +-(2^53 - 1)")
        return value

    try:
        data = json.loads(
            path.read_bytes().decode("utf-8"),
            object_pairs_hook=no_duplicates,
            parse_constant=no_constants,
            parse_float=finite_float,
            parse_int=safe_int,
        )
        # An escaped lone surrogate ("\ud800") parses, but cannot be written back as UTF-8:
        # it would break every later reply that shows the manifest.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise PackageRejected(
            "not_json",
            name,
            "a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)",
            expected="a UTF-8 JSON object",
        ) from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise PackageRejected(
            "not_json", name, f"not valid JSON ({e})", expected="a UTF-8 JSON object"
        ) from e
    return data


def _check_manifest(path: Path, base: BaseModelSpec, namespace: str | None) -> ExpertManifest:
    data = _load_json(path, MANIFEST_FILE)
    if not isinstance(data, dict):
        raise PackageRejected(
            "manifest_schema",
            MANIFEST_FILE,
            f"the manifest is a JSON {type(data).__name__}",
            expected="a JSON object",
        )
    # Checked before the schema so that a newer manifest gets a clear answer.
    version = data.get("format_version", FORMAT_VERSION)
    if type(version) is not int or version != FORMAT_VERSION:
        raise PackageRejected(
            "format_version",
            MANIFEST_FILE,
            f"format_version {json.dumps(version)} is not supported",
            expected=f"format_version {FORMAT_VERSION}",
        )
    try:
        manifest = ExpertManifest.model_validate(data)
    except pydantic.ValidationError as e:
        errors = e.errors()
        first = errors[0]
        field = ".".join(str(part) for part in first["loc"]) or "(root)"
        problem = "is missing" if first["type"] == "missing" else f"is invalid ({first['msg']})"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise PackageRejected(
            "manifest_schema",
            MANIFEST_FILE,
            f"field '{field}' {problem}{more}",
            expected=_schema_expectation(first),
        ) from e

    identity = manifest.base_model
    if identity.name != base.name:
        raise PackageRejected(
            "base_model",
            MANIFEST_FILE,
            f"the expert was trained on base model '{identity.name}'",
            expected=f"base model '{base.name}'",
        )
    if identity.fingerprint != base.fingerprint:
        raise PackageRejected(
            "fingerprint",
            MANIFEST_FILE,
            f"base model fingerprint {identity.fingerprint} differs from this platform's "
            f"'{base.name}' (different weights)",
            expected=base.fingerprint,
        )
    if namespace is not None and "/" in manifest.name:
        owner = manifest.name.split("/", 1)[0]
        if owner != namespace:
            raise PackageRejected(
                "namespace",
                MANIFEST_FILE,
                f"name '{manifest.name}' is in namespace '{owner}', not the uploader's",
                expected=f"'{namespace}/<slug>' or a bare slug",
            )
    return manifest


def _schema_expectation(error: Any) -> str:
    """What the schema wanted, from a pydantic error, in words that follow "expected"."""
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "the field to be present (see docs/expert-package.md)"
    if kind == "extra_forbidden":
        return "only the fields of the manifest schema"
    if kind == "string_pattern_mismatch":
        return f"a string matching {context['pattern']}"
    return str(error["msg"])


def _check_adapter_config(path: Path, base: BaseModelSpec, limits: AdmissionLimits) -> _LoraLayout:
    name = ADAPTER_CONFIG_FILE
    config = _load_json(path, name)
    if not isinstance(config, dict):
        raise PackageRejected(
            "peft_config", name, f"a JSON {type(config).__name__}", expected="a JSON object"
        )

    def reject(detail: str, expected: str) -> PackageRejected:
        return PackageRejected("peft_config", name, detail, expected=expected)

    if config.get("peft_type") != "LORA":
        raise reject(
            f"peft_type is {json.dumps(config.get('peft_type'))}", expected='peft_type "LORA"'
        )
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise reject(f"r is {json.dumps(rank)}", expected="r a positive integer")
    if rank > limits.max_rank:
        raise PackageRejected("rank", name, f"r is {rank}", expected=f"r at most {limits.max_rank}")
    alpha = config.get("lora_alpha")
    # bool is an int to isinstance, but not a number here.
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise reject(f"lora_alpha is {json.dumps(alpha)}", expected="lora_alpha a positive number")
    if not math.isfinite(alpha) or alpha <= 0:
        raise reject(f"lora_alpha is {json.dumps(alpha)}", expected="lora_alpha a positive number")
    use_rslora = config.get("use_rslora", False)
    if type(use_rslora) is not bool:
        raise reject(f"use_rslora is {json.dumps(use_rslora)}", expected="use_rslora true or false")

    target = config.get("target_modules")
    if isinstance(target, str):
        # PEFT reads a string as a regular expression; an untrusted one can backtrack for
        # exponential time, so the package must list the names instead.
        raise reject(
            f"target_modules is the regular expression {_shorten(json.dumps(target))}",
            expected="target_modules a list of module names (or full module paths)",
        )
    if not target:
        raise reject(
            f"target_modules is {_shorten(json.dumps(target))}",
            expected="target_modules a non-empty list of names",
        )
    _check_name_list(target, "target_modules")
    exclude = config.get("exclude_modules")
    if exclude is not None:
        _check_name_list(exclude, "exclude_modules")

    task_type = config.get("task_type")
    expected_task = _TASK_TYPES[base.is_encoder_decoder]
    if task_type is not None and task_type != expected_task:
        raise reject(
            f"task_type {_shorten(json.dumps(task_type))} does not fit the "
            f"{base.architecture} base model",
            expected=f'task_type "{expected_task}" or null',
        )
    init = config.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS or (init in (0, 1) and type(init) is not bool):
        raise reject(
            f"init_lora_weights {_shorten(json.dumps(init))} changes the base model's weights",
            expected='init_lora_weights true, false, "gaussian", "eva" or "orthogonal"',
        )
    handled = {"r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "task_type"}
    for key in sorted(config):
        if key in _INERT_CONFIG_KEYS or key in handled:
            continue
        if not _is_off(config[key]):
            raise reject(
                f"{_shorten(key, 100)} is {_shorten(json.dumps(config[key]))}: "
                "the platform routes plain LoRA updates only",
                expected=f'{_shorten(key, 100)} null, false, empty or "none"',
            )

    modules = adapted_modules(target, base, exclude)
    if not modules:
        raise reject(
            f"target_modules {_shorten(json.dumps(target))} match no linear module "
            f"of '{base.name}'",
            expected="names of linear modules of the base model (e.g. "
            + ", ".join(sorted({m.path.rsplit(".", 1)[-1] for m in base.linear_modules}))
            + ")",
        )
    targets = tuple(sorted(set(target)))
    return _LoraLayout(
        config=_canonical_config(config, base, targets, sorted(set(exclude)) if exclude else None),
        target_modules=targets,
        rank=rank,
        lora_alpha=float(alpha),
        scale=lora_scale(rank, float(alpha), use_rslora),
        modules=modules,
    )


def _check_name_list(value: Any, key: str) -> None:
    """A bounded list of module names: each non-empty, printable and at most
    MAX_IDENTIFIER_CHARS long (matching is linear in them, and they are stored and shown)."""
    expected = (
        f"{key} a list of at most {MAX_TARGET_MODULES} module names, each a non-empty "
        f"printable string of at most {MAX_IDENTIFIER_CHARS} characters"
    )
    if not isinstance(value, list):
        raise PackageRejected(
            "peft_config",
            ADAPTER_CONFIG_FILE,
            f"{key} is {_shorten(json.dumps(value))}",
            expected=expected,
        )
    if len(value) > MAX_TARGET_MODULES:
        raise PackageRejected(
            "peft_config",
            ADAPTER_CONFIG_FILE,
            f"{key} lists {len(value)} names",
            expected=expected,
        )
    for index, name in enumerate(value):
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_IDENTIFIER_CHARS
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        ):
            raise PackageRejected(
                "peft_config",
                ADAPTER_CONFIG_FILE,
                f"{key}[{index}] is {_shorten(json.dumps(name))}",
                expected=expected,
            )


def _shorten(text: str, limit: int = 200) -> str:
    """At most `limit` characters of `text` (error messages echo what was sent)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _canonical_config(
    config: dict[str, Any],
    base: BaseModelSpec,
    target_modules: tuple[str, ...],
    exclude_modules: list[str] | None,
) -> dict[str, Any]:
    """The adapter config as stored and served: only the options the platform checked, with
    their checked values; every other option written out as off. Nothing the uploader wrote
    outside these survives, so nothing in it can make PEFT import or download code."""
    return {
        **_CANONICAL_OFF,
        "base_model_name_or_path": base.name,
        "exclude_modules": exclude_modules,
        "inference_mode": True,
        "lora_alpha": config["lora_alpha"],
        "peft_type": "LORA",
        "r": config["r"],
        "target_modules": list(target_modules),
        "task_type": config.get("task_type"),
        "use_rslora": config.get("use_rslora", False),
    }


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "none" or value in ({}, [])


def _check_manifest_matches_config(manifest: ExpertManifest, layout: _LoraLayout) -> None:
    """The manifest's summary must say what the config (and so the tensors, which must
    match the config exactly) adapts: releases and the catalog read the summary."""
    summary = manifest.lora
    for field, stated, actual in (
        ("lora.r", summary.r, layout.rank),
        ("lora.lora_alpha", summary.lora_alpha, layout.lora_alpha),
        ("lora.modules", summary.modules, len(layout.modules)),
    ):
        if stated != actual:
            raise PackageRejected(
                "manifest_mismatch",
                MANIFEST_FILE,
                f"{field} is {stated} but adapter_config.json gives {actual}",
                expected=f"{field} {actual}",
            )
    # PEFT keeps target_modules as a set: order and repeats carry no meaning.
    stated_targets = sorted(set(summary.target_modules))
    if stated_targets != list(layout.target_modules):
        raise PackageRejected(
            "manifest_mismatch",
            MANIFEST_FILE,
            f"lora.target_modules is {_shorten(json.dumps(stated_targets))} but "
            f"adapter_config.json targets {_shorten(json.dumps(list(layout.target_modules)))}",
            expected=f"lora.target_modules {_shorten(json.dumps(list(layout.target_modules)))}",
        )


def _check_manifest_flags(
    manifest: ExpertManifest, has_average_activation: bool, has_retrieval: bool
) -> None:
    for field, stated, actual in (
        ("has_average_activation", manifest.has_average_activation, has_average_activation),
        ("has_retrieval_embeddings", manifest.has_retrieval_embeddings, has_retrieval),
    ):
        if stated != actual:
            raise PackageRejected(
                "manifest_mismatch",
                MANIFEST_FILE,
                f"{field} is {str(stated).lower()} but the files say otherwise",
                expected=f"{field} {str(actual).lower()}",
            )


def _check_privacy(manifest: ExpertManifest) -> None:
    """A stated DP guarantee must fit the package and the training it describes, and its
    epsilon must be at least what the accountant gives for its own noise, rate and steps."""
    guarantee = manifest.privacy
    if guarantee is None:
        return
    training = manifest.training

    def reject(detail: str, expected: str) -> PackageRejected:
        return PackageRejected("privacy", MANIFEST_FILE, f"privacy: {detail}", expected=expected)

    for field, present in (
        ("has_average_activation", manifest.has_average_activation),
        ("has_retrieval_embeddings", manifest.has_retrieval_embeddings),
    ):
        if present:
            raise reject(
                f"the package states a DP guarantee and {field} true; nothing privatises them",
                expected=f"{field} false (or no privacy field)",
            )
    trained_steps = training.steps + training.gate_steps
    if guarantee.steps != trained_steps:
        raise reject(
            f"steps is {guarantee.steps} but training ran {training.steps} LoRA and "
            f"{training.gate_steps} gate steps",
            expected=f"steps {trained_steps}",
        )
    if training.batch_size is not None and training.examples > 0:
        rate = training.batch_size / training.examples
        if not math.isclose(guarantee.sample_rate, min(rate, 1.0), rel_tol=1e-6):
            raise reject(
                f"sample_rate is {guarantee.sample_rate} but batch {training.batch_size} of "
                f"{training.examples} examples samples at {rate:.6g}",
                expected=f"sample_rate {min(rate, 1.0):.6g}",
            )
    spent = accounted_epsilon(
        noise_multiplier=guarantee.noise_multiplier,
        sample_rate=guarantee.sample_rate,
        steps=guarantee.steps,
        delta=guarantee.delta,
        accountant=guarantee.accountant,
    )
    if guarantee.epsilon < spent * (1 - EPSILON_TOLERANCE):  # a smaller claim is a false one
        raise reject(
            f"epsilon {guarantee.epsilon:.6g} is less than the {guarantee.accountant} "
            f"accountant's {spent:.6g} for noise multiplier {guarantee.noise_multiplier}, "
            f"sample rate {guarantee.sample_rate} and {guarantee.steps} steps",
            expected=f"epsilon >= {spent:.6g}",
        )


# --- safetensors files -----------------------------------------------------------------


@contextmanager
def _open_safetensors(name: str, path: Path, limits: AdmissionLimits) -> Iterator[Any]:
    """Open through the safetensors package, which checks the header and every offset.

    `name` is the package file name; uploads may sit on disk under temporary names.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
    header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
    # Only a length that fits in the file is a real header; anything else is left to
    # safetensors to refuse as not a safetensors file.
    if limits.max_header_bytes < header_bytes <= size - 8:
        raise PackageRejected(
            "too_large",
            name,
            f"the safetensors header is {header_bytes} bytes",
            expected=f"at most {limits.max_header_bytes} bytes",
        )
    try:
        handle = safe_open(str(path), framework="numpy")
    except Exception as e:  # the Rust parser raises SafetensorError, others on odd input
        raise PackageRejected(
            "not_safetensors",
            name,
            f"not a valid safetensors file ({e})",
            expected="a safetensors file (8-byte header length, JSON header, tensor data)",
        ) from e
    with handle as f:
        _check_unique_header_keys(name, path, header_bytes)
        yield f


def _check_unique_header_keys(name: str, path: Path, header_bytes: int) -> None:
    """Reject a header with a key twice, such as a tensor named twice.

    safetensors keeps one of the duplicates; another reader may keep the other, so the
    tensor validated here would not be the tensor loaded there. safetensors has already
    accepted the header, so its length and JSON are known to be sound.
    """
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(header_bytes)
    # The hook runs innermost object first: the last call is the top level (tensor names).
    duplicates_per_object: list[list[str]] = []

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()  # linear: a header may hold hundreds of thousands of keys
        duplicates = []
        for key, _ in pairs:
            if key in seen:
                duplicates.append(key)
            seen.add(key)
        duplicates_per_object.append(duplicates)
        return dict(pairs)

    try:
        json.loads(header, object_pairs_hook=collect)
    except (ValueError, RecursionError) as e:  # a header safetensors' own JSON reader took
        raise PackageRejected(
            "not_safetensors",
            name,
            f"the header is not strict JSON ({e})",
            expected="a JSON object header",
        ) from e
    top_level = duplicates_per_object[-1] if duplicates_per_object else []
    if top_level:
        raise PackageRejected(
            "not_safetensors",
            name,
            f"the header names tensor '{top_level[0]}' more than once",
            tensor=top_level[0],
            expected="each tensor named once",
        )
    nested = [k for keys in duplicates_per_object for k in keys]
    if nested:
        raise PackageRejected(
            "not_safetensors",
            name,
            f"the header gives the field '{nested[0]}' of a tensor more than once",
            expected="each field given once",
        )


def _check_exact_names(
    name: str, present: set[str], required: set[str], optional: set[str], what: str
) -> None:
    missing = sorted(required - present)
    if missing:
        raise PackageRejected(
            "tensor_names",
            name,
            f"required tensor missing ({len(missing)} missing in all)",
            tensor=missing[0],
            expected=what,
        )
    extra = sorted(present - required - optional)
    if extra:
        raise PackageRejected(
            "tensor_names",
            name,
            f"unexpected tensor ({len(extra)} unexpected in all)",
            tensor=extra[0],
            expected=what,
        )


def _check_adapter_names(f: Any, modules: tuple[LinearModuleSpec, ...]) -> None:
    required = {key for m in modules for key in lora_keys(m.path)}
    _check_exact_names(
        ADAPTER_WEIGHTS_FILE,
        set(f.keys()),
        required,
        set(),
        f"exactly lora_A and lora_B for the {len(modules)} modules target_modules selects "
        f"('{PEFT_KEY_PREFIX}<module path>{LORA_A_SUFFIX}' and ...{LORA_B_SUFFIX})",
    )


def _check_router_names(f: Any, modules: tuple[LinearModuleSpec, ...]) -> bool:
    """Check the router's names; return whether it carries average activations."""
    gates = {m.path + GATE_SUFFIX for m in modules}
    averages = {m.path + AVERAGE_ACTIVATION_SUFFIX for m in modules}
    present = set(f.keys())
    _check_exact_names(
        ROUTER_FILE,
        present,
        gates,
        averages,
        f"'<module path>{GATE_SUFFIX}' for each of the {len(modules)} adapted modules, "
        f"optionally '<module path>{AVERAGE_ACTIVATION_SUFFIX}' for all of them",
    )
    given = present & averages
    if given and given != averages:
        missing = sorted(averages - given)
        raise PackageRejected(
            "tensor_names",
            ROUTER_FILE,
            f"average activations given for {len(given)} of {len(modules)} adapted modules, "
            f"missing '{missing[0]}'",
            tensor=missing[0],
            expected="average activations for every adapted module or for none",
        )
    return bool(given)


def _check_retrieval_names(f: Any) -> None:
    _check_exact_names(
        RETRIEVAL_FILE,
        set(f.keys()),
        {RETRIEVAL_EMBEDDINGS_KEY},
        set(),
        f"one tensor named '{RETRIEVAL_EMBEDDINGS_KEY}'",
    )


def _check_tensor_header(
    f: Any, name: str, key: str, shape: tuple[int, ...], dtypes: tuple[str, ...]
) -> None:
    info = f.get_slice(key)
    actual_shape = tuple(info.get_shape())
    if actual_shape != shape:
        raise PackageRejected(
            "shape",
            name,
            f"shape {list(actual_shape)}",
            tensor=key,
            expected=f"shape {list(shape)}",
        )
    dtype = info.get_dtype()
    if dtype not in dtypes:
        hint = (
            " (bfloat16 cannot be validated without torch: convert to float32 before saving)"
            if dtype == "BF16"
            else ""
        )
        raise PackageRejected(
            "dtype",
            name,
            f"dtype {_DTYPE_NAMES.get(dtype, dtype)}{hint}",
            tensor=key,
            expected="dtype " + " or ".join(_DTYPE_NAMES[d] for d in dtypes),
        )


def _check_adapter_headers(f: Any, layout: _LoraLayout) -> None:
    for m in layout.modules:
        key_a, key_b = lora_keys(m.path)
        r = layout.rank
        _check_tensor_header(f, ADAPTER_WEIGHTS_FILE, key_a, (r, m.in_features), LORA_DTYPES)
        _check_tensor_header(f, ADAPTER_WEIGHTS_FILE, key_b, (m.out_features, r), LORA_DTYPES)


def _check_router_headers(
    f: Any, modules: tuple[LinearModuleSpec, ...], has_average_activation: bool
) -> None:
    suffixes = (
        (GATE_SUFFIX, AVERAGE_ACTIVATION_SUFFIX) if has_average_activation else (GATE_SUFFIX,)
    )
    for m in modules:
        for suffix in suffixes:
            _check_tensor_header(f, ROUTER_FILE, m.path + suffix, (m.in_features,), (VECTOR_DTYPE,))


def _check_retrieval_header(f: Any, limits: AdmissionLimits) -> int:
    """Check the embeddings' shape and dtype; return the number of examples."""
    key = RETRIEVAL_EMBEDDINGS_KEY
    shape = tuple(f.get_slice(key).get_shape())
    dim = limits.retrieval_embedding_dim
    expected_shape = (
        f"shape [examples, {dim}] with 1 <= examples <= {limits.max_retrieval_examples}"
    )
    if len(shape) != 2 or shape[1] != dim or shape[0] < 1:
        raise PackageRejected(
            "shape", RETRIEVAL_FILE, f"shape {list(shape)}", tensor=key, expected=expected_shape
        )
    if shape[0] > limits.max_retrieval_examples:
        raise PackageRejected(
            "retrieval_examples",
            RETRIEVAL_FILE,
            f"{shape[0]} embedded examples",
            tensor=key,
            expected=f"at most {limits.max_retrieval_examples}",
        )
    _check_tensor_header(f, RETRIEVAL_FILE, key, shape, (VECTOR_DTYPE,))
    return int(shape[0])


def _finite(name: str, key: str, values: np.ndarray) -> np.ndarray:
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise PackageRejected(
            "non_finite",
            name,
            f"{bad} of {values.size} values are NaN or infinite",
            tensor=key,
            expected="finite values",
        )
    return values


def _check_adapter_values(f: Any, layout: _LoraLayout, limits: AdmissionLimits) -> None:
    for m in layout.modules:
        key_a, key_b = lora_keys(m.path)
        lora_a = _finite(ADAPTER_WEIGHTS_FILE, key_a, f.get_tensor(key_a))
        lora_b = _finite(ADAPTER_WEIGHTS_FILE, key_b, f.get_tensor(key_b))
        norm = lora_update_norm(lora_a, lora_b, layout.scale)
        if norm > limits.max_update_norm:
            raise PackageRejected(
                "update_norm",
                ADAPTER_WEIGHTS_FILE,
                f"the update scale * B @ A of module '{m.path}' has Frobenius norm {norm:.4g}",
                tensor=key_b,
                expected=f"at most {limits.max_update_norm:g}",
            )


def _check_router_values(
    f: Any,
    modules: tuple[LinearModuleSpec, ...],
    has_average_activation: bool,
    limits: AdmissionLimits,
) -> None:
    for m in modules:
        key = m.path + GATE_SUFFIX
        gate = _finite(ROUTER_FILE, key, f.get_tensor(key)).astype(np.float64)
        norm = float(np.linalg.norm(gate))
        if norm > limits.max_gate_norm:
            raise PackageRejected(
                "gate_norm",
                ROUTER_FILE,
                f"gate L2 norm {norm:.4g}",
                tensor=key,
                expected=f"at most {limits.max_gate_norm:g}",
            )
        std = float(gate.std())
        if std < limits.min_gate_std:
            raise PackageRejected(
                "gate_constant",
                ROUTER_FILE,
                f"the gate is constant (standard deviation {std:.3g}): was the gate step run?",
                tensor=key,
                expected=f"a standard deviation of at least {limits.min_gate_std:g}",
            )
        if has_average_activation:
            key = m.path + AVERAGE_ACTIVATION_SUFFIX
            average = _finite(ROUTER_FILE, key, f.get_tensor(key)).astype(np.float64)
            norm = float(np.linalg.norm(average))
            if norm > limits.max_average_activation_norm:
                raise PackageRejected(
                    "average_activation_norm",
                    ROUTER_FILE,
                    f"average activation L2 norm {norm:.4g}",
                    tensor=key,
                    expected=f"at most {limits.max_average_activation_norm:g}",
                )


def _check_retrieval_values(f: Any) -> None:
    key = RETRIEVAL_EMBEDDINGS_KEY
    embeddings = _finite(RETRIEVAL_FILE, key, f.get_tensor(key)).astype(np.float64)
    # Retrieval ranks by cosine similarity, undefined for a zero vector.
    zero_rows = np.flatnonzero(np.linalg.norm(embeddings, axis=1) == 0)
    if zero_rows.size:
        raise PackageRejected(
            "zero_embedding",
            RETRIEVAL_FILE,
            f"{zero_rows.size} embedding(s) are zero, first row {int(zero_rows[0])}",
            tensor=key,
            expected="non-zero embeddings (cosine similarity needs a direction)",
        )
