"""What an expert package holds, and whether the coordinator would accept it.

The admission check is the coordinator's own (`protocol.validation.validate_package`), run
locally against the spec of the local base model, so a contributor learns of a rejection
before uploading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from phatgoose.expert import Expert, ExpertError
from phatgoose.models import base_model_spec, load_base_model
from protocol import MANIFEST_FILE, PACKAGE_FILES, BaseModelSpec, ExpertManifest
from protocol.limits import DEFAULT_LIMITS, AdmissionLimits
from protocol.validation import PackageRejected, ValidatedPackage, validate_package


@dataclass
class PackageReport:
    directory: Path
    files: dict[str, int]  # package file -> bytes
    extra_files: list[str]  # anything else in the directory (never uploaded)
    base: str
    manifest: ExpertManifest | None = None
    expert: Expert | None = None
    load_error: str | None = None
    accepted: ValidatedPackage | None = None
    rejection: dict[str, Any] | None = field(default=None)

    @property
    def passes(self) -> bool:
        return self.accepted is not None


def manifest_base_name(directory: str | Path) -> str | None:
    """The base model the package's manifest names, if the manifest can be read."""
    try:
        return ExpertManifest.model_validate_json(
            (Path(directory) / MANIFEST_FILE).read_text()
        ).base_model.name
    except (OSError, ValueError):
        return None


def inspect_package(
    directory: str | Path,
    *,
    base: str,
    base_model: PreTrainedModel | None = None,
    base_spec: BaseModelSpec | None = None,
    limits: AdmissionLimits = DEFAULT_LIMITS,
) -> PackageReport:
    """Read the package in `directory` and run the coordinator's admission on it.

    `base` is the base model's name as the coordinator knows it; the spec is computed from
    `base_model` (or from the model `base` loads) unless `base_spec` is given.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    entries = sorted(p.name for p in directory.iterdir())
    files = {n: (directory / n).stat().st_size for n in entries if n in PACKAGE_FILES}
    report = PackageReport(
        directory=directory,
        files=files,
        extra_files=[n for n in entries if n not in PACKAGE_FILES],
        base=base,
    )
    try:
        report.expert = Expert.load(directory)
        report.manifest = report.expert.manifest
    except ExpertError as error:
        report.load_error = str(error)
    if base_spec is None:
        model = base_model if base_model is not None else load_base_model(base)[0]
        base_spec = base_model_spec(model, base)
    try:
        report.accepted = validate_package(
            {name: directory / name for name in files}, base_spec, limits
        )
    except PackageRejected as rejection:
        report.rejection = rejection.to_dict()
    return report
