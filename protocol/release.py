"""The release manifest (`release.json`): a routing method, its k and hyper-parameters over
fixed expert versions.

The coordinator writes it (`ReleaseManifest(...).model_dump(mode="json")`) and serves it at
`/api/v1/releases/{n}/manifest`; `phatgoose.load_release` reads it with
`parse_release_manifest`. A manifest of another format or a newer `format_version` is
refused before its fields are read, so an older library says why rather than which field.
`method_params` must be exactly what `protocol.resolve_params` makes of them (every
parameter, defaults included), so the manifest alone says how the release was built.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, Final, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from protocol.manifest import DIGEST_PATTERN, SLUG_PATTERN, BaseModelIdentity
from protocol.methods import (
    METHOD_SPECS,
    ROUTER_NUMERICS,
    TOP_K_METHODS,
    ParamValue,
    RoutingMethod,
    is_method,
    resolve_params,
)
from protocol.package import PACKAGE_FILES, REQUIRED_FILES
from protocol.validation import package_digest

RELEASE_FILE = "release.json"
RELEASE_FORMAT: Final = "phatgoose-release"
# 2: `router_numerics` records how token routers standardise their rows (1 for every
# release of format_version 1, whose manifests do not carry it).
# 3: `method_params` records every hyper-parameter of the method, resolved (releases of
# format_version 1 and 2 were made before methods had any: their method's defaults).
RELEASE_FORMAT_VERSION: Final = 3
SHA256_HEX_PATTERN = r"^[0-9a-f]{64}$"
# A file's `url`: an absolute path on the server that serves the manifest (never another
# host: `//host/x` and schemes are refused here, and `load_release` checks the origin of
# the joined URL again). No query, fragment, backslash or control character.
FILE_URL_PATTERN = r"^/([A-Za-z0-9._~@%+=:,-][A-Za-z0-9._~@%+=:,/-]*)?$"
MAX_FILE_URL_LENGTH = 2048
_SLUG = f"^{SLUG_PATTERN}$"


class InvalidReleaseManifest(ValueError):
    """A release manifest that does not follow the format; the message names the field."""


def expert_package_path(namespace: str, name: str, version: int) -> str:
    """Where an expert's files live inside a release directory: `experts/<ns>/<name>/<v>`."""
    return f"experts/{namespace}/{name}/{version}"


class ReleaseFile(BaseModel):
    """One file of an expert package, as the coordinator stores and serves it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: str = Field(examples=["adapter_model.safetensors"])
    sha256: str = Field(pattern=SHA256_HEX_PATTERN)
    size: int = Field(ge=0)
    url: str = Field(
        pattern=FILE_URL_PATTERN,
        max_length=MAX_FILE_URL_LENGTH,
        examples=["/api/v1/experts/alice/hyperbaton/2/files/adapter_model.safetensors"],
        description="where the coordinator serves it: a path on the manifest's own server",
    )

    @model_validator(mode="after")
    def _is_a_package_file(self) -> Self:
        if self.filename not in PACKAGE_FILES:
            raise ValueError(
                f"filename {self.filename!r} is not a package file ({', '.join(PACKAGE_FILES)})"
            )
        return self


class ReleasedExpert(BaseModel):
    """An expert version frozen into a release: its package digest and every file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(examples=["alice/hyperbaton@2"], description="namespace/name@version")
    namespace: str = Field(pattern=_SLUG)
    name: str = Field(pattern=_SLUG)
    version: int = Field(ge=1)
    package_digest: str = Field(pattern=DIGEST_PATTERN)
    rank: int | None = Field(default=None, ge=1)
    modules: int | None = Field(default=None, ge=1, description="number of adapted modules")
    path: str = Field(
        description="its directory in an exported release: always "
        "experts/<namespace>/<name>/<version> (the default)"
    )
    files: list[ReleaseFile]

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any) -> Any:
        ref_parts = ("namespace", "name", "version")
        if isinstance(data, dict) and "path" not in data and all(k in data for k in ref_parts):
            path = expert_package_path(data["namespace"], data["name"], data["version"])
            return {**data, "path": path}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.ref != f"{self.full_name}@{self.version}":
            raise ValueError(
                f"ref {self.ref!r} is not namespace/name@version ({self.full_name}@{self.version})"
            )
        names = [f.filename for f in self.files]
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        if repeated:
            raise ValueError(f"{self.ref} lists {', '.join(repeated)} more than once")
        missing = [n for n in REQUIRED_FILES if n not in names]
        if missing:
            raise ValueError(f"{self.ref} lacks the package file(s) {', '.join(missing)}")
        # The path becomes a folder under the release directory: only the one the ref
        # names, so no manifest can point a reader outside it.
        expected_path = expert_package_path(self.namespace, self.name, self.version)
        if self.path != expected_path:
            raise ValueError(f"{self.ref}: path {self.path!r} must be {expected_path!r}")
        # The digest names the package's cache folder: it must be the digest of the files
        # listed, so a manifest cannot file one package's bytes under another's digest.
        digest = package_digest({f.filename: f.sha256 for f in self.files})
        if self.package_digest != digest:
            raise ValueError(
                f"{self.ref}: package_digest {self.package_digest} is not the digest of "
                f"its files' sha256 ({digest})"
            )
        return self

    @property
    def full_name(self) -> str:
        """`namespace/name`: how the release names the expert."""
        return f"{self.namespace}/{self.name}"


class ReleaseBaseModel(BaseModelIdentity):
    """The base model every expert of the release was trained on."""

    model_config = ConfigDict(extra="forbid")

    architecture: str | None = Field(default=None, examples=["llama", "t5"])


class ReleaseManifest(BaseModel):
    """Everything `phatgoose.load_release` needs, frozen when the release is created."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["phatgoose-release"]
    format_version: Literal[1, 2, 3]
    number: int = Field(ge=1)
    method: RoutingMethod
    top_k: int | None = Field(default=None, ge=1, description=f"for {', '.join(TOP_K_METHODS)}")
    # Strict: a JSON value is kept as it is (no bool read as 1), so a manifest states its
    # parameters exactly as `protocol.resolve_params` gives them.
    method_params: dict[str, StrictInt | StrictFloat | StrictStr] = Field(
        description="every hyper-parameter of the method, resolved (protocol.MethodSpec.params; "
        "{} for methods without any)",
        examples=[{"density": 0.2, "scale": 1.0}],
    )
    router_numerics: int = Field(
        ge=1,
        le=ROUTER_NUMERICS,
        description="how token routers standardise their rows (protocol.ROUTER_NUMERICS)",
    )
    expert: str | None = Field(
        default=None, description="method single: the expert used, as namespace/name"
    )
    base_model: ReleaseBaseModel
    experts: list[ReleasedExpert]
    notes: str = ""
    created_by: str | None = None
    created_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_format(cls, data: Any) -> Any:
        """Format and version first: a newer manifest may differ in any other field."""
        if not isinstance(data, dict):
            return data
        if data.get("format") != RELEASE_FORMAT:
            raise ValueError(
                f"not a release manifest: format is {data.get('format')!r}, "
                f"expected {RELEASE_FORMAT!r}"
            )
        version = data.get("format_version")
        if type(version) is not int or not 1 <= version <= RELEASE_FORMAT_VERSION:
            newer = (
                " (a newer phatgoose reads it)"
                if type(version) is int and version > RELEASE_FORMAT_VERSION
                else ""
            )
            raise ValueError(
                f"release format_version {version!r} is not supported: this library reads "
                f"format_version 1 to {RELEASE_FORMAT_VERSION}{newer}"
            )
        if version < 3:
            if "method_params" in data:
                raise ValueError(f"method_params is not part of release format_version {version}")
            # Methods had no parameters then: the defaults are what the release was made with.
            method = data.get("method")
            if isinstance(method, str) and is_method(method):
                data = {**data, "method_params": resolve_params(method)}
            else:  # the method's own error names it
                data = {**data, "method_params": {}}
        if version == 1:
            if "router_numerics" in data:
                raise ValueError("router_numerics is not part of release format_version 1")
            return {**data, "router_numerics": 1}  # what every release then was made with
        numerics = data.get("router_numerics")
        if type(numerics) is int and numerics > ROUTER_NUMERICS:
            raise ValueError(
                f"router_numerics {numerics} is not supported: this library routes with 1 to "
                f"{ROUTER_NUMERICS} (a newer phatgoose reads it)"
            )
        return data

    @field_validator("method_params")
    @classmethod
    def _resolved(
        cls, params: dict[str, ParamValue], info: ValidationInfo
    ) -> dict[str, ParamValue]:
        """Exactly what `resolve_params` makes of them: every parameter, each value one the
        method takes (an integer as an integer), nothing else."""
        method = info.data.get("method")
        if method is None:  # an unknown method: its own error names it
            return params
        resolved = resolve_params(method, params)  # a ValueError names parameter and values
        missing = [name for name in resolved if name not in params]
        if missing:
            defaults = ", ".join(f"{name} (default {resolved[name]!r})" for name in missing)
            raise ValueError(f"method {method!r}: every parameter is recorded; missing {defaults}")
        for name, value in params.items():
            if type(value) is not type(resolved[name]):  # 1.0 for an integer
                raise ValueError(
                    f"method {method!r}: parameter {name!r} is recorded as {resolved[name]!r}, "
                    f"got {value!r}"
                )
        return params

    @model_validator(mode="after")
    def _fits_the_method(self) -> Self:
        spec = METHOD_SPECS[self.method]
        if not spec.takes_experts and self.experts:
            raise ValueError(f"method {self.method!r} takes no experts, got {len(self.experts)}")
        if spec.takes_experts and not self.experts:
            raise ValueError(f"method {self.method!r} needs at least one expert")
        names = [e.full_name for e in self.experts]
        repeated = sorted(n for n, count in Counter(names).items() if count > 1)
        if repeated:
            raise ValueError(f"an expert may appear once per release: {', '.join(repeated)}")
        if spec.takes_top_k and self.top_k is None:
            raise ValueError(f"method {self.method!r} selects top_k experts and needs top_k")
        if spec.takes_top_k and self.top_k is not None and self.top_k > len(self.experts):
            raise ValueError(f"top_k={self.top_k} but the release has {len(names)} expert(s)")
        if not spec.takes_top_k and self.top_k is not None:
            raise ValueError(f"top_k is for {', '.join(TOP_K_METHODS)}, not {self.method!r}")
        if spec.single_expert and self.expert not in names:
            raise ValueError(
                f"method {self.method!r} needs `expert` naming one of {names}, got {self.expert!r}"
            )
        if not spec.single_expert and self.expert is not None:
            raise ValueError(f"`expert` is for method 'single', not {self.method!r}")
        return self


def parse_release_manifest(data: object) -> ReleaseManifest:
    """`data` (a parsed JSON value) as a manifest, or `InvalidReleaseManifest` saying why."""
    if not isinstance(data, dict):
        raise InvalidReleaseManifest(
            f"a release manifest is a JSON object, got {type(data).__name__}"
        )
    try:
        return ReleaseManifest.model_validate(data)
    except ValidationError as error:
        version = data.get("format_version", RELEASE_FORMAT_VERSION)
        raise InvalidReleaseManifest(describe_errors(error.errors(), version)) from None


def describe_errors(errors: list[ErrorDetails], format_version: object) -> str:
    """The first schema error in words, naming its field (`experts.0.files.1.sha256`)."""
    first = errors[0]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "value_error":  # a rule of the validators above: their own words
        problem = str((first.get("ctx") or {}).get("error", first["msg"]))
        return f"{field}: {problem}{more}" if field else problem + more
    if first["type"] == "missing":
        return f"release manifest field {field!r} is missing{more}"
    if first["type"] == "extra_forbidden":
        return (
            f"release manifest field {field!r} is not part of format_version {format_version}{more}"
        )
    return f"release manifest field {field!r} is invalid ({first['msg']}){more}"
