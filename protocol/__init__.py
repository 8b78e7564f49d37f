"""The expert package format, manifests and schemas shared by every part of the platform.

Pure data: no torch. Parameters travel as safetensors, metadata as JSON validated by the
pydantic models here.
"""

from protocol.base_model import BaseModelSpec, LinearModuleSpec
from protocol.limits import DEFAULT_LIMITS, AdmissionLimits
from protocol.manifest import (
    FORMAT_VERSION,
    BaseModelIdentity,
    ExpertManifest,
    LoraSummary,
    TrainingSummary,
)
from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AVERAGE_ACTIVATION_SUFFIX,
    GATE_SUFFIX,
    MANIFEST_FILE,
    OPTIONAL_FILES,
    PACKAGE_FILES,
    REQUIRED_FILES,
    RETRIEVAL_EMBEDDINGS_KEY,
    RETRIEVAL_FILE,
    ROUTER_FILE,
)
from protocol.validation import (
    PackageRejected,
    ValidatedPackage,
    package_digest,
    validate_directory,
    validate_package,
)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AVERAGE_ACTIVATION_SUFFIX",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "GATE_SUFFIX",
    "MANIFEST_FILE",
    "OPTIONAL_FILES",
    "PACKAGE_FILES",
    "REQUIRED_FILES",
    "RETRIEVAL_EMBEDDINGS_KEY",
    "RETRIEVAL_FILE",
    "ROUTER_FILE",
    "AdmissionLimits",
    "BaseModelIdentity",
    "BaseModelSpec",
    "ExpertManifest",
    "LinearModuleSpec",
    "LoraSummary",
    "PackageRejected",
    "TrainingSummary",
    "ValidatedPackage",
    "package_digest",
    "validate_directory",
    "validate_package",
]
