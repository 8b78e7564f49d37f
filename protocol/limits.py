"""Admission limits: the bounds an expert package must stay within to be accepted.

Every bound is configurable (the coordinator reads them from its settings); the defaults
and the reasoning behind each are documented in docs/expert-package.md.
"""

from pydantic import BaseModel, ConfigDict, Field

from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    MAX_RETRIEVAL_EXAMPLES,
    RETRIEVAL_EMBEDDING_DIM,
    RETRIEVAL_FILE,
    ROUTER_FILE,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class AdmissionLimits(BaseModel):
    """Upper bounds checked by `protocol.validation.validate_package`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Sizes, in bytes. A rank-16 adapter on every linear of a 7B model is about 160 MB in
    # float32, so the adapter limit leaves room for larger ranks; the router holds one or
    # two vectors per module (a few MB even for large models).
    max_json_bytes: int = Field(
        default=1 * MiB, gt=0, description="expert.json, adapter_config.json"
    )
    max_adapter_bytes: int = Field(default=768 * MiB, gt=0)
    max_router_bytes: int = Field(default=64 * MiB, gt=0)
    # 1000 x 384 float32 is 1.5 MiB; the rest is header.
    max_retrieval_bytes: int = Field(default=4 * MiB, gt=0)
    max_total_bytes: int = Field(default=1 * GiB, gt=0)
    # A safetensors header lists names, shapes and offsets: about 100 bytes per tensor, so
    # even thousands of modules fit in well under 1 MiB.
    max_header_bytes: int = Field(default=8 * MiB, gt=0)

    # The paper uses r = 16; routers zero-pad experts to the largest rank, so one huge rank
    # would cost every release that includes the expert.
    max_rank: int = Field(default=256, gt=0)

    # L2 norm of each gate vector. Gates start at zero and take ~100 AdamW steps at lr 5e-3:
    # each coordinate moves at most ~lr per step, so |v_i| <= ~0.5 and ||v|| <= ~0.5 sqrt(n)
    # (12 for n = 576, 52 for n = 11008). 100 is above any honestly trained gate.
    max_gate_norm: float = Field(default=100.0, gt=0)
    # Standard deviation of each gate over its n coordinates. A (near) constant gate
    # standardises to zero or to noise: the gate step was not run.
    min_gate_std: float = Field(default=1e-6, ge=0)
    # Frobenius norm of each module's update scale * B @ A (which bounds its spectral norm).
    # Base weights of models up to ~7B have Frobenius norms of tens to a few hundred; an
    # update far above that replaces the layer rather than adapting it.
    max_update_norm: float = Field(default=1000.0, gt=0)
    # L2 norm of each average activation: a sanity ceiling orders of magnitude above the mean
    # input of a linear layer in real models (post-norm inputs have norm ~ sqrt(n)).
    max_average_activation_norm: float = Field(default=1e5, gt=0)

    # Retrieval baseline: up to 1000 all-MiniLM-L6-v2 embeddings (384 dimensions).
    max_retrieval_examples: int = Field(default=MAX_RETRIEVAL_EXAMPLES, gt=0)
    retrieval_embedding_dim: int = Field(default=RETRIEVAL_EMBEDDING_DIM, gt=0)

    def max_file_bytes(self, name: str) -> int:
        """The size limit for the package file called `name`."""
        return {
            MANIFEST_FILE: self.max_json_bytes,
            ADAPTER_CONFIG_FILE: self.max_json_bytes,
            ADAPTER_WEIGHTS_FILE: self.max_adapter_bytes,
            ROUTER_FILE: self.max_router_bytes,
            RETRIEVAL_FILE: self.max_retrieval_bytes,
        }[name]


DEFAULT_LIMITS = AdmissionLimits()
