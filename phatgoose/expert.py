"""`Expert`: one expert package in memory, and its files on disk.

An expert is a standard PEFT LoRA adapter plus the small vectors routers need (the
PHATGOOSE gate and, optionally, the average activation of every adapted module) and a
manifest. On disk it is the package of `protocol.package`:

    adapter_config.json, adapter_model.safetensors  PEFT's own format, unchanged
    router.safetensors     `<module path>.gate`, `<module path>.average_activation`
    expert.json            the manifest
    retrieval.safetensors  optional MiniLM embeddings of training inputs

LoRA tensors keep PEFT's keys (`base_model.model.<path>.lora_A.weight`, defined in
`protocol.peft_format`); everything else speaks in module paths of the *base* model
(`model.layers.0.self_attn.q_proj`). This class is where the two meet. Only safetensors and
JSON are read: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from protocol import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AVERAGE_ACTIVATION_SUFFIX,
    GATE_SUFFIX,
    MANIFEST_FILE,
    REQUIRED_FILES,
    RETRIEVAL_EMBEDDINGS_KEY,
    RETRIEVAL_FILE,
    ROUTER_FILE,
    VECTOR_DTYPE,
    ExpertManifest,
    LoraSummary,
    PrivacyGuarantee,
    lora_key,
    lora_scale,
    parse_lora_key,
)
from protocol.peft_format import LORA_A_SUFFIX, PEFT_KEY_PREFIX

# The package's dtype rule for router vectors and embeddings, in torch's terms.
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16}
VECTOR_TORCH_DTYPE = _TORCH_DTYPES[VECTOR_DTYPE]


class ExpertError(ValueError):
    """An expert (in memory or on disk) is malformed or inconsistent."""


def module_order_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for module paths: numeric parts compare as numbers (layer 2 before 10)."""
    return tuple(
        (0, int(part)) if part.isascii() and part.isdigit() else (1, part)
        for part in path.split(".")
    )


def lora_summary(lora_config: LoraConfig, modules: int) -> LoraSummary:
    """The manifest's summary of a LoRA config (the config itself stays authoritative)."""
    targets = lora_config.target_modules
    if targets is None:
        target_list: list[str] = []
    elif isinstance(targets, str):
        target_list = [targets]
    else:
        target_list = sorted(targets)
    return LoraSummary(
        r=lora_config.r,
        lora_alpha=float(lora_config.lora_alpha),
        target_modules=target_list,
        modules=modules,
    )


@dataclass(eq=False)
class Expert:
    """An expert package in memory; validated on construction (`ExpertError` if not).

    `gates` maps base-model module paths to float32 `[in_features]` vectors: either one per
    adapted module or none at all (a LoRA-only expert, whose manifest says `gate_steps=0`;
    the coordinator only accepts experts with gates). `average_activations`, when given,
    also covers every module.
    """

    manifest: ExpertManifest
    lora_config: LoraConfig
    lora_weights: dict[str, Tensor]
    gates: dict[str, Tensor] = field(default_factory=dict)
    average_activations: dict[str, Tensor] | None = None
    retrieval_embeddings: Tensor | None = None

    def __post_init__(self) -> None:
        self._paths = _lora_module_paths(self.lora_weights)
        self._validate()

    # ----------------------------------------------------------------- accessors
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def rank(self) -> int:
        """The largest LoRA rank over modules (`lora_config.r` unless a rank_pattern is set)."""
        return max(self.lora_weights[lora_key(p, "A")].shape[0] for p in self._paths)

    @property
    def has_gates(self) -> bool:
        return bool(self.gates)

    def module_paths(self) -> list[str]:
        """Base-model paths of the adapted modules, sorted by `module_order_key` (layer order)."""
        return list(self._paths)

    def lora_update(self, path: str) -> tuple[Tensor, Tensor, float]:
        """`(A [r, n], B [d, r], scale)` at a module: its update is `scale * B @ A`."""
        if path not in self._paths:
            raise KeyError(
                f"expert {self.name!r} has no LoRA module at {path!r}; "
                f"it adapts {len(self._paths)} modules, e.g. {self._paths[:3]}"
            )
        a = self.lora_weights[lora_key(path, "A")]
        b = self.lora_weights[lora_key(path, "B")]
        return a, b, self._scale(path, a.shape[0])

    def _scale(self, path: str, r: int) -> float:
        alpha_pattern = self.lora_config.alpha_pattern or {}
        alpha_key = get_pattern_key(list(alpha_pattern), path)
        alpha = float(alpha_pattern.get(alpha_key, self.lora_config.lora_alpha))
        return lora_scale(r, alpha, bool(self.lora_config.use_rslora))

    # ------------------------------------------------------------ derived experts
    def with_gates(
        self,
        gates: dict[str, Tensor],
        *,
        gate_steps: int,
        final_gate_loss: float | None = None,
        gate_precision: str | None = None,
        privacy: PrivacyGuarantee | None = None,
    ) -> Expert:
        """A copy with these gates, the manifest's training summary updated, and `privacy`
        as the expert's guarantee (None: none, whatever the LoRA had)."""
        training = self.manifest.training.model_copy(
            update={
                "gate_steps": gate_steps,
                "final_gate_loss": final_gate_loss,
                "gate_precision": gate_precision,
            }
        )
        manifest = self.manifest.model_copy(update={"training": training, "privacy": privacy})
        return dataclasses.replace(self, manifest=manifest, gates=dict(gates))

    def with_average_activations(self, activations: dict[str, Tensor] | None) -> Expert:
        """A copy with these average activations (or none) and the manifest flag to match."""
        manifest = self.manifest.model_copy(
            update={"has_average_activation": activations is not None}
        )
        return dataclasses.replace(
            self,
            manifest=manifest,
            average_activations=None if activations is None else dict(activations),
        )

    def with_retrieval_embeddings(self, embeddings: Tensor | None) -> Expert:
        """A copy with these retrieval embeddings (or none) and the manifest flag to match."""
        manifest = self.manifest.model_copy(
            update={"has_retrieval_embeddings": embeddings is not None}
        )
        return dataclasses.replace(self, manifest=manifest, retrieval_embeddings=embeddings)

    # ------------------------------------------------------------------ on disk
    def save(self, directory: str | Path) -> Path:
        """Write the package files into `directory` (created if needed); returns it.

        A stale `retrieval.safetensors` from an earlier save is removed when this expert
        has no embeddings, so the directory always describes exactly this expert.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # LoraConfig's own serialisation, so PeftModel.from_pretrained reads it unchanged.
        self.lora_config.save_pretrained(str(directory))
        save_file(
            {k: v.detach().contiguous() for k, v in self.lora_weights.items()},
            str(directory / ADAPTER_WEIGHTS_FILE),
            metadata={"format": "pt"},
        )
        router = {p + GATE_SUFFIX: g.detach().contiguous() for p, g in self.gates.items()}
        for path, activation in (self.average_activations or {}).items():
            router[path + AVERAGE_ACTIVATION_SUFFIX] = activation.detach().contiguous()
        save_file(router, str(directory / ROUTER_FILE), metadata={"format": "pt"})
        (directory / MANIFEST_FILE).write_text(self.manifest.model_dump_json(indent=2) + "\n")
        retrieval = directory / RETRIEVAL_FILE
        if self.retrieval_embeddings is not None:
            save_file(
                {RETRIEVAL_EMBEDDINGS_KEY: self.retrieval_embeddings.detach().contiguous()},
                str(retrieval),
                metadata={"format": "pt"},
            )
        elif retrieval.exists():
            retrieval.unlink()
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Expert:
        """Read and check a package directory (safetensors and JSON only)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ExpertError(f"{directory}: not a directory (expected an expert package)")
        missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
        if missing:
            raise ExpertError(
                f"{directory}: missing package file(s) {missing}; "
                f"a package has {list(REQUIRED_FILES)}"
            )
        manifest = _read_manifest(directory / MANIFEST_FILE)
        lora_config = read_lora_config(directory)
        lora_weights = _read_safetensors(directory / ADAPTER_WEIGHTS_FILE)
        router = _read_safetensors(directory / ROUTER_FILE)

        gates: dict[str, Tensor] = {}
        activations: dict[str, Tensor] = {}
        for key, tensor in router.items():
            if key.endswith(GATE_SUFFIX):
                gates[key.removesuffix(GATE_SUFFIX)] = tensor
            elif key.endswith(AVERAGE_ACTIVATION_SUFFIX):
                activations[key.removesuffix(AVERAGE_ACTIVATION_SUFFIX)] = tensor
            else:
                raise ExpertError(
                    f"{directory / ROUTER_FILE}: unexpected tensor {key!r}; keys must end "
                    f"in {GATE_SUFFIX!r} or {AVERAGE_ACTIVATION_SUFFIX!r}"
                )

        embeddings = None
        retrieval = directory / RETRIEVAL_FILE
        if retrieval.is_file():
            tensors = _read_safetensors(retrieval)
            if set(tensors) != {RETRIEVAL_EMBEDDINGS_KEY}:
                raise ExpertError(
                    f"{retrieval}: expected exactly one tensor {RETRIEVAL_EMBEDDINGS_KEY!r}, "
                    f"found {sorted(tensors)}"
                )
            embeddings = tensors[RETRIEVAL_EMBEDDINGS_KEY]

        try:
            return cls(
                manifest=manifest,
                lora_config=lora_config,
                lora_weights=lora_weights,
                gates=gates,
                average_activations=activations or None,
                retrieval_embeddings=embeddings,
            )
        except ExpertError as error:
            raise ExpertError(f"{directory}: {error}") from None

    # --------------------------------------------------------------- validation
    def _validate(self) -> None:
        _check_lora_config(self.lora_config)
        name = self.manifest.name
        shapes: dict[str, tuple[int, int]] = {}  # path -> (in_features n, rank r)
        for path in self._paths:
            a = self.lora_weights[lora_key(path, "A")]
            b = self.lora_weights[lora_key(path, "B")]
            if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
                raise ExpertError(
                    f"expert {name!r}, module {path}: lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)} do not form B [d, r] @ A [r, n]"
                )
            expected_r = _expected_rank(self.lora_config, path)
            if a.shape[0] != expected_r:
                raise ExpertError(
                    f"expert {name!r}, module {path}: rank {a.shape[0]} but the LoRA config "
                    f"says r={expected_r}"
                )
            shapes[path] = (a.shape[1], a.shape[0])

        _check_vectors(name, "gate", self.gates, shapes, required=False)
        if self.average_activations is not None:
            _check_vectors(
                name, "average activation", self.average_activations, shapes, required=True
            )
        if self.retrieval_embeddings is not None:
            emb = self.retrieval_embeddings
            if emb.ndim != 2 or emb.shape[0] == 0 or emb.dtype != VECTOR_TORCH_DTYPE:
                raise ExpertError(
                    f"expert {name!r}: retrieval embeddings must be float32 [examples >= 1, "
                    f"dim], got {emb.dtype} {tuple(emb.shape)}"
                )
        self._check_manifest()

    def _check_manifest(self) -> None:
        m = self.manifest
        problems = []
        if m.lora.modules != len(self._paths):
            problems.append(f"lora.modules={m.lora.modules} but {len(self._paths)} are adapted")
        if m.lora.r != self.lora_config.r:
            problems.append(f"lora.r={m.lora.r} but the LoRA config has r={self.lora_config.r}")
        if m.lora.lora_alpha != float(self.lora_config.lora_alpha):
            problems.append(
                f"lora.lora_alpha={m.lora.lora_alpha} but the config has "
                f"{self.lora_config.lora_alpha}"
            )
        if not self.gates and m.training.gate_steps != 0:
            problems.append(f"training.gate_steps={m.training.gate_steps} but there are no gates")
        if m.has_average_activation != (self.average_activations is not None):
            problems.append(
                f"has_average_activation={m.has_average_activation} but average activations "
                f"are {'present' if self.average_activations is not None else 'absent'}"
            )
        if m.has_retrieval_embeddings != (self.retrieval_embeddings is not None):
            problems.append(
                f"has_retrieval_embeddings={m.has_retrieval_embeddings} but embeddings are "
                f"{'present' if self.retrieval_embeddings is not None else 'absent'}"
            )
        if problems:
            raise ExpertError(f"expert {m.name!r}: manifest disagrees: " + "; ".join(problems))


def read_lora_config(directory: str | Path) -> LoraConfig:
    """The `adapter_config.json` of a directory as a LoraConfig; other PEFT types refused."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExpertError(f"{path}: missing (expected a PEFT adapter config)") from None
    except json.JSONDecodeError as error:
        raise ExpertError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ExpertError(
            f"{path}: peft_type is {found!r}; only LoRA adapters ('LORA') are experts"
        )
    config: LoraConfig = LoraConfig.from_pretrained(str(Path(directory)))
    _check_lora_config(config, where=str(path))
    return config


def _check_lora_config(config: LoraConfig, where: str = "LoRA config") -> None:
    if not isinstance(config, LoraConfig):
        raise ExpertError(f"{where}: expected a peft.LoraConfig, got {type(config).__name__}")
    unsupported = {
        "use_dora": bool(config.use_dora),
        "modules_to_save": bool(config.modules_to_save),
        "lora_bias": bool(config.lora_bias),
        "bias": config.bias != "none",
        "layer_replication": bool(config.layer_replication),
        "trainable_token_indices": bool(config.trainable_token_indices),
    }
    used = [name for name, on in unsupported.items() if on]
    if used:
        raise ExpertError(
            f"{where}: {used} not supported; an expert is plain LoRA (B A updates only)"
        )


def _expected_rank(config: LoraConfig, path: str) -> int:
    rank_pattern = config.rank_pattern or {}
    return int(rank_pattern.get(get_pattern_key(list(rank_pattern), path), config.r))


def _lora_module_paths(lora_weights: dict[str, Tensor]) -> list[str]:
    """Base-model paths named by PEFT keys, each with both A and B; layer-sorted."""
    found: dict[str, set[str]] = {}
    for key in lora_weights:
        parsed = parse_lora_key(key)
        if parsed is None:
            raise ExpertError(
                f"LoRA tensor {key!r}: expected PEFT's key form "
                f"'{PEFT_KEY_PREFIX}<module path>{LORA_A_SUFFIX}' (or lora_B)"
            )
        path, matrix = parsed
        found.setdefault(path, set()).add(matrix)
    if not found:
        raise ExpertError("no LoRA tensors: an expert adapts at least one module")
    incomplete = sorted(p for p, m in found.items() if m != {"A", "B"})
    if incomplete:
        raise ExpertError(f"modules with only one of lora_A/lora_B: {incomplete[:5]}")
    return sorted(found, key=module_order_key)


def _check_vectors(
    name: str,
    kind: str,
    vectors: dict[str, Tensor],
    shapes: dict[str, tuple[int, int]],
    *,
    required: bool,
) -> None:
    """Router vectors: one float32 [in_features] per LoRA module (or none if not required)."""
    if not vectors and not required:
        return
    unknown = sorted(set(vectors) - set(shapes), key=module_order_key)
    if unknown:
        raise ExpertError(f"expert {name!r}: {kind} for modules without LoRA: {unknown[:5]}")
    missing = sorted(set(shapes) - set(vectors), key=module_order_key)
    if missing:
        raise ExpertError(
            f"expert {name!r}: no {kind} for {len(missing)} LoRA module(s), e.g. {missing[:5]}"
        )
    for path, vector in vectors.items():
        n = shapes[path][0]
        if vector.dtype != VECTOR_TORCH_DTYPE or tuple(vector.shape) != (n,):
            raise ExpertError(
                f"expert {name!r}, module {path}: {kind} must be float32 [{n}] "
                f"(the module's in_features), got {vector.dtype} {tuple(vector.shape)}"
            )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ExpertError(f"{path}: not a readable safetensors file ({error})") from None


def _read_manifest(path: Path) -> ExpertManifest:
    try:
        return ExpertManifest.model_validate_json(path.read_text())
    except ValidationError as error:
        raise ExpertError(f"{path}: invalid manifest: {error}") from None
