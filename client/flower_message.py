"""An expert package as the content of a Flower reply (the wire format of docs/federation.md).

Nothing but the package travels: each safetensors file becomes one `ArrayRecord` (named by
the file) whose `Array`s carry the tensors' raw bytes exactly as they lie in the file
(`stype = "safetensors.raw"`, `dtype` the safetensors dtype such as `"F32"`); the JSON files
and each safetensors file's header metadata travel as strings in the `ConfigRecord`
`"package"`, together with the sha256 of every file, so that the receiver re-creates the
files bit-exactly and can prove it. A tensor the coordinator said it stores (the train
message's `known` digests) is named by its digest instead of sent (`<file>.stored`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Collection, Mapping
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from protocol.flower import (
    FILES_KEY,
    JSON_FILES,
    METADATA_SUFFIX,
    PACKAGE_RECORD,
    RAW_STYPE,
    SAFETENSORS_FILES,
    SHA256_SUFFIX,
    STORED_SUFFIX,
    TRAINING_RECORD,
)


def read_safetensors_raw(data: bytes) -> tuple[dict[str, Array], dict[str, str] | None]:
    """The tensors of a safetensors file as raw `Array`s (file order), and its metadata."""
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its 8-byte header length")
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    metadata = header.pop("__metadata__", None)
    body = memoryview(data)[8 + header_length :]
    arrays: dict[str, Array] = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        start, end = entry["data_offsets"]
        arrays[name] = Array(
            dtype=entry["dtype"],
            shape=tuple(int(d) for d in entry["shape"]),
            stype=RAW_STYPE,
            data=bytes(body[start:end]),
        )
    return arrays, metadata


def package_to_content(
    directory: str | Path,
    training: Mapping[str, float] | None = None,
    known: Collection[str] = frozenset(),
) -> RecordDict:
    """The reply content carrying the expert package in `directory`; tensors whose raw
    bytes' sha256 is in `known` (the coordinator stores them) are named, not sent."""
    directory = Path(directory)
    package = ConfigRecord()
    content = RecordDict()
    files: list[str] = []
    for name in JSON_FILES + SAFETENSORS_FILES:
        path = directory / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        files.append(name)
        package[name + SHA256_SUFFIX] = hashlib.sha256(data).hexdigest()
        if name in JSON_FILES:
            package[name] = data.decode("utf-8")
            continue
        arrays, metadata = read_safetensors_raw(data)
        stored = {}
        for key, array in list(arrays.items()):
            digest = hashlib.sha256(array.data).hexdigest()
            if digest in known:
                stored[key] = {"sha256": digest, "dtype": array.dtype, "shape": list(array.shape)}
                del arrays[key]
        content[name] = ArrayRecord(arrays)
        package[name + METADATA_SUFFIX] = "" if metadata is None else json.dumps(metadata)
        if stored:
            package[name + STORED_SUFFIX] = json.dumps(stored)
    package[FILES_KEY] = files
    content[PACKAGE_RECORD] = package
    if training:
        content[TRAINING_RECORD] = MetricRecord({k: float(v) for k, v in training.items()})
    return content
