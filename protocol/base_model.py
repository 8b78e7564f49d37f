"""What the platform knows about a base model: its identity and its linear modules.

Uploads are validated against this: an expert may only touch modules listed here, with
exactly these shapes.
"""

from pydantic import BaseModel, ConfigDict, Field

from protocol.manifest import DIGEST_PATTERN

# Names are printable: no control characters (a NUL byte cannot even be stored by PostgreSQL).
PRINTABLE_PATTERN = r"^[^\x00-\x1f\x7f]*$"
MAX_FEATURES = 2**31 - 1  # far beyond any linear layer; within every database's integers


class LinearModuleSpec(BaseModel):
    """One `nn.Linear` of the base model, named by its path in `model.named_modules()`."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(examples=["model.layers.0.self_attn.q_proj"], pattern=PRINTABLE_PATTERN)
    in_features: int = Field(gt=0, le=MAX_FEATURES)
    out_features: int = Field(gt=0, le=MAX_FEATURES)


class BaseModelSpec(BaseModel):
    name: str = Field(examples=["smollm2-135m"], pattern=PRINTABLE_PATTERN)
    revision: str | None = Field(default=None, pattern=PRINTABLE_PATTERN)
    fingerprint: str = Field(pattern=DIGEST_PATTERN)
    architecture: str = Field(examples=["llama", "t5"], pattern=PRINTABLE_PATTERN)
    is_encoder_decoder: bool = False
    linear_modules: list[LinearModuleSpec]

    def module(self, path: str) -> LinearModuleSpec | None:
        return self._by_path().get(path)

    def _by_path(self) -> dict[str, LinearModuleSpec]:
        return {m.path: m for m in self.linear_modules}
