"""The expert manifest (`expert.json`): who made an expert, for which base model, and how."""

import re
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSION: Final = 1

# A namespace, or an expert's name within it.
SLUG_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,62}"
# `namespace/slug` or a bare slug; the coordinator fills in the uploader's namespace.
EXPERT_NAME_PATTERN = rf"^({SLUG_PATTERN}/)?{SLUG_PATTERN}$"


def slug(text: str) -> str:
    """A valid namespace or expert name from free text (`My Adapter_v2` -> `my-adapter_v2`,
    `parent/subtask` -> `parent-subtask`); `expert` when nothing usable is left."""
    cleaned = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-._")
    return cleaned[:63] or "expert"


# A content digest (a package, a base model's weights): `sha256:<64 hex>`.
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


class BaseModelIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    revision: str | None = None
    fingerprint: str = Field(pattern=DIGEST_PATTERN)


class LoraSummary(BaseModel):
    """A summary of the PEFT config; `adapter_config.json` itself is authoritative."""

    r: int = Field(gt=0)
    lora_alpha: float = Field(gt=0)
    target_modules: list[str]
    modules: int = Field(ge=1, description="number of adapted linear modules")


class TrainingSummary(BaseModel):
    examples: int = Field(ge=0)
    steps: int = Field(ge=0)
    gate_steps: int = Field(ge=0)
    batch_size: int | None = None
    learning_rate: float | None = None
    final_loss: float | None = None
    best_validation_loss: float | None = None
    final_gate_loss: float | None = None
    seconds: float | None = None


class ExpertManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=EXPERT_NAME_PATTERN, examples=["alice/hyperbaton"])
    description: str = Field(default="", max_length=10_000)
    base_model: BaseModelIdentity
    lora: LoraSummary
    license: str = Field(default="Apache-2.0", description="an SPDX identifier")
    training: TrainingSummary
    has_average_activation: bool = False
    has_retrieval_embeddings: bool = False
    library_version: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
