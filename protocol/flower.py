"""How an expert package travels in a Flower reply (docs/federation.md).

The client writes and the coordinator reads this layout; both import it from here so the
two sides cannot drift apart. Each safetensors file travels as an `ArrayRecord` of its
tensors' raw bytes; the JSON files, the safetensors headers' metadata and every file's
sha256 travel in the `ConfigRecord` named `PACKAGE_RECORD`.
"""

from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    RETRIEVAL_FILE,
    ROUTER_FILE,
)

PACKAGE_RECORD = "package"
TRAINING_RECORD = "training"
TRAIN_CONFIG_RECORD = "config"
RAW_STYPE = "safetensors.raw"
FILES_KEY = "files"
METADATA_SUFFIX = ".metadata"
SHA256_SUFFIX = ".sha256"
JSON_FILES = (MANIFEST_FILE, ADAPTER_CONFIG_FILE)
SAFETENSORS_FILES = (ADAPTER_WEIGHTS_FILE, ROUTER_FILE, RETRIEVAL_FILE)
