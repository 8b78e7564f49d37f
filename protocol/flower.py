"""What travels between the coordinator's ServerApp and the contributors' ClientApps
(docs/federation.md): the train request going out, the expert package coming back.

Both sides import these definitions from here so that they cannot drift apart.

- `TrainingRequest`: the hyper-parameters every node trains with, sent in the train
  message's `ConfigRecord` named `TRAIN_CONFIG_RECORD`.
- `RoundSettings`: the run-level settings only the round itself reads (how many nodes, how
  long to wait, which coordinator registers the replies).
- The reply: each safetensors file travels as an `ArrayRecord` of its tensors' raw bytes;
  the JSON files, the safetensors headers' metadata and every file's sha256 travel in the
  `ConfigRecord` named `PACKAGE_RECORD`.
- Deltas: the train message's `ConfigRecord` `KNOWN_RECORD` lists (`KNOWN_KEY`) the sha256
  of tensors the coordinator already stores for the node's namespace (its experts' latest
  versions); a tensor whose raw bytes hash to one of them is left out of the reply's
  `ArrayRecord` and named in `PACKAGE_RECORD[<file> + STORED_SUFFIX]` instead (JSON: tensor
  name -> sha256, dtype, shape), and the coordinator takes its bytes from its store.

Flower's run config (`[tool.flwr.app.config]` in pyproject.toml, overridden by
`flwr run --run-config`) holds the keys of both settings; `split_run_config` reads it.
"""

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    RETRIEVAL_FILE,
    ROUTER_FILE,
)
from protocol.precision import Precision
from protocol.privacy import DEFAULT_MAX_GRAD_NORM

PACKAGE_RECORD = "package"
TRAINING_RECORD = "training"
TRAIN_CONFIG_RECORD = "config"
RAW_STYPE = "safetensors.raw"
FILES_KEY = "files"
METADATA_SUFFIX = ".metadata"
SHA256_SUFFIX = ".sha256"
STORED_SUFFIX = ".stored"
KNOWN_RECORD = "known"
KNOWN_KEY = "sha256"
# Tensor digests one train message lists at most (the rest are sent as bytes, as always).
MAX_KNOWN_TENSORS = 20_000
JSON_FILES = (MANIFEST_FILE, ADAPTER_CONFIG_FILE)
SAFETENSORS_FILES = (ADAPTER_WEIGHTS_FILE, ROUTER_FILE, RETRIEVAL_FILE)

# What a Flower ConfigRecord (and a run config value) can hold of the settings below.
ConfigValue = int | float | str | bool


class FlowerConfigError(ValueError):
    """A run config or train message whose key or value is not what the platform expects."""


def _kebab(field_name: str) -> str:
    return field_name.replace("_", "-")


class _FlowerSettings(BaseModel):
    """Settings spelt the Flower way (`lora-rank`) on the wire, the Python way in code.

    Strict: a run config's `lora-rank = "8"` or `average-activation = 1` is an error, not a
    guess (an int is still accepted for a float).
    """

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="forbid",
        alias_generator=_kebab,
        validate_by_name=True,
        validate_by_alias=True,
    )
    # What the settings are called in error messages.
    described_as: ClassVar[str] = "settings"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The settings' keys as Flower spells them."""
        return tuple(_kebab(name) for name in cls.model_fields)

    def to_config(self) -> dict[str, ConfigValue]:
        """The settings as a Flower `ConfigRecord`'s (or run config's) items."""
        config: dict[str, ConfigValue] = self.model_dump(by_alias=True)
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """The settings from Flower-spelt keys; a missing key takes its default.

        Raises `FlowerConfigError` naming every bad key and value, or the unknown key.
        """
        try:
            return cls.model_validate(dict(config), by_alias=True, by_name=False)
        except ValidationError as error:
            raise FlowerConfigError(_describe(cls, error)) from None

    def with_changes(self, **changes: Any) -> Self:
        """A copy with some settings changed (by their Python names), validated again."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as error:
            raise FlowerConfigError(_describe(type(self), error)) from None


def _describe(settings: type[_FlowerSettings], error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {key!r} (known: {', '.join(settings.keys())})")
        else:
            problems.append(f"{key!r} = {item['input']!r}: {item['msg']}")
    return f"{settings.described_as}: " + "; ".join(problems)


class TrainingRequest(_FlowerSettings):
    """The training settings of a Flower train message.

    The defaults are the run config's (pyproject.toml, `[tool.flwr.app.config]`; a test keeps
    the two equal): LoRA, then the PHATGOOSE gates (METHOD.md), sized for a 2-core CPU.
    """

    described_as: ClassVar[str] = "train request"

    # A name the platform knows (`smollm2-135m`) or a local Hugging Face model directory.
    base_model: str = Field(default="smollm2-135m", min_length=1)
    lora_rank: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_steps: int = Field(default=40, ge=1)
    gate_steps: int = Field(default=8, ge=1)
    batch_size: int = Field(default=4, ge=1)
    max_length: int = Field(default=128, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    gate_learning_rate: float = Field(default=1e-3, ge=0)  # 0: the LoRA learning rate
    max_examples: int = Field(default=0, ge=0)  # 0: every training example the node holds
    average_activation: bool = True
    seed: int = 0
    # Each node resolves `auto` on its own hardware (bfloat16 where it is native).
    precision: Precision = "auto"
    # Differential privacy (DP-SGD, docs/privacy.md): the (epsilon, delta) every node's expert
    # must meet; 0: none asked (a node may still ask for its own with its node config's
    # `dp-epsilon`, and the stricter applies). Under DP nodes ship no average activations.
    dp_epsilon: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    dp_delta: float = Field(default=0.0, ge=0, lt=1)  # 0: min(1e-5, 1 / (10 n))
    dp_max_grad_norm: float = Field(default=DEFAULT_MAX_GRAD_NORM, gt=0, allow_inf_nan=False)


class RoundSettings(_FlowerSettings):
    """The run-level settings of a Flower round (never sent to the nodes).

    The defaults are the run config's (pyproject.toml, `[tool.flwr.app.config]`).
    """

    described_as: ClassVar[str] = "round settings"

    # Wait until this many SuperNodes are connected, or until the wait is over.
    min_nodes: int = Field(default=1, ge=1)
    node_wait_seconds: float = Field(default=60.0, ge=0)
    # How long to wait for the replies (0: no limit).
    round_timeout_seconds: float = Field(default=3600.0, ge=0)
    # Where replies are registered ("" = the coordinator's settings, PHATGOOSE_DATA_DIR and
    # PHATGOOSE_DATABASE_URL).
    coordinator_data_dir: str = ""
    coordinator_database_url: str = ""
    # Each node publishes under its own namespace, `<namespace>-<node id>` (a node id has at
    # most 20 digits and a namespace at most 64 characters).
    namespace: str = Field(default="flower", pattern=r"^[a-z0-9][a-z0-9_.-]{0,39}$")
    # Create a node's contributor token on its first reply; false: only nodes whose
    # `<namespace>-<node id>` contributor token the operator created may publish.
    create_node_tokens: bool = True
    # Local simulation only (no node config there): "name=path;name=path", one per node.
    simulation_datasets: str = ""


def run_config_defaults() -> dict[str, ConfigValue]:
    """Every run config key with its default: what `[tool.flwr.app.config]` must hold (Flower
    refuses a `--run-config` override of a key that table lacks)."""
    return {**TrainingRequest().to_config(), **RoundSettings().to_config()}


def split_run_config(run_config: Mapping[str, Any]) -> tuple[TrainingRequest, RoundSettings]:
    """A Flower run config as the nodes' training request and the round's settings.

    Raises `FlowerConfigError` for a bad value or a key belonging to neither.
    """
    training_keys = set(TrainingRequest.keys())
    unknown = sorted(set(run_config) - training_keys - set(RoundSettings.keys()))
    if unknown:
        raise FlowerConfigError(
            f"run config: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(run_config_defaults())})"
        )
    training = {k: v for k, v in run_config.items() if k in training_keys}
    round_settings = {k: v for k, v in run_config.items() if k not in training_keys}
    return TrainingRequest.from_config(training), RoundSettings.from_config(round_settings)
