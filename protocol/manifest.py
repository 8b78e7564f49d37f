"""The expert manifest (`expert.json`): who made an expert, for which base model, and how."""

import re
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.precision import ComputePrecisionName
from protocol.privacy import PrivacyGuarantee

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

# Bounds on what a manifest may hold. Every string and list the catalog stores and shows is
# bounded: an unbounded licence once made every catalog row a megabyte.
MAX_IDENTIFIER_CHARS = 256  # names, revisions, versions, licences, module names
MAX_DESCRIPTION_CHARS = 10_000
MAX_TARGET_MODULES = 1024  # names in `target_modules` (PEFT configs list a handful)
# Counts stay exact in every JSON reader (I-JSON, RFC 7493: integers within +-(2^53 - 1)).
MAX_SAFE_INTEGER = 2**53 - 1
# Identifiers are printable: no control characters (nor NUL, which PostgreSQL cannot store).
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
ModuleName = Annotated[
    str, Field(min_length=1, max_length=MAX_IDENTIFIER_CHARS, pattern=_PRINTABLE)
]
Identifier = Annotated[str, Field(max_length=MAX_IDENTIFIER_CHARS, pattern=_PRINTABLE)]
Count = Annotated[int, Field(ge=0, le=MAX_SAFE_INTEGER)]


class BaseModelIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: Identifier
    revision: Identifier | None = None
    fingerprint: str = Field(pattern=DIGEST_PATTERN)


class LoraSummary(BaseModel):
    """A summary of the PEFT config; `adapter_config.json` itself is authoritative."""

    r: int = Field(gt=0, le=MAX_SAFE_INTEGER)
    lora_alpha: float = Field(gt=0, allow_inf_nan=False)
    target_modules: list[ModuleName] = Field(max_length=MAX_TARGET_MODULES)
    modules: int = Field(ge=1, le=MAX_SAFE_INTEGER, description="number of adapted linear modules")


class TrainingSummary(BaseModel):
    examples: Count
    steps: Count
    gate_steps: Count
    batch_size: Count | None = None
    learning_rate: float | None = None
    final_loss: float | None = None
    best_validation_loss: float | None = None
    final_gate_loss: float | None = None
    seconds: float | None = None
    # The compute precision of LoRA and gate training ("float32" or "bfloat16"); the
    # package's tensors are float32 either way. None: not recorded (older packages, imports).
    precision: ComputePrecisionName | None = None
    gate_precision: ComputePrecisionName | None = None


class ExpertManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=EXPERT_NAME_PATTERN, examples=["alice/hyperbaton"])
    description: str = Field(default="", max_length=MAX_DESCRIPTION_CHARS)
    base_model: BaseModelIdentity
    lora: LoraSummary
    license: Identifier = Field(default="Apache-2.0", description="an SPDX identifier")
    training: TrainingSummary
    has_average_activation: bool = False
    has_retrieval_embeddings: bool = False
    # Differential privacy of the LoRA and gates (protocol/privacy.py); None: trained
    # without DP, no guarantee. Versioned by its own `format_version`.
    privacy: PrivacyGuarantee | None = None
    library_version: Identifier
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
