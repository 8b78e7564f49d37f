"""Package files in pieces: a safetensors file is its header, then each tensor's bytes.

A new version of an expert often shares most of its tensors with the previous one
(retraining only the gates leaves every LoRA tensor as it was). Cut at tensor boundaries, a
file becomes a list of segments, each named by its sha256; the coordinator stores each
segment once however many versions hold it, and `phatgoose client push` sends only the
segments the coordinator lacks. The concatenation of a file's segments is the file, byte for
byte, so its digest (and its package's) never changes with how it was stored or sent.

The wire format of a delta upload (docs/coordinator.md, "Delta uploads"):
- `POST /api/v1/blobs/missing` with `{"sha256": [...]}` answers which digests the catalog
  does not hold;
- the upload (`POST /api/v1/experts`) then carries `layout.json` (a `PackageLayout`: every
  package file's digest, size and segments) in the field `layout`, each missing segment as a
  part in the field `segments` whose filename is its digest, and any package file sent whole
  as in a plain upload.

Cutting is defined for any bytes: a file that is not a well-formed safetensors file (holes,
overlaps, a header that is not JSON) is one segment, itself, and admission says what is wrong
with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol.package import PACKAGE_FILES

LAYOUT_FILE = "layout.json"
LAYOUT_FIELD = "layout"
SEGMENT_FIELD = "segments"
# A header longer than this is not parsed for cutting (admission refuses far less).
_MAX_CUT_HEADER_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 1024 * 1024

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class Span:
    """Bytes `[offset, offset + size)` of a file; `tensor` names the tensor ('' for the header)."""

    offset: int
    size: int
    tensor: str = ""


@dataclass(frozen=True)
class Segment:
    """A span's bytes, by digest."""

    sha256: str
    size: int
    tensor: str = ""


@dataclass(frozen=True)
class CutFile:
    """A file's digest and size, and its segments in order (their concatenation is the file)."""

    sha256: str
    size: int
    segments: tuple[Segment, ...]


def cut_points(path: Path) -> list[Span]:
    """Where `path` is cut: for a well-formed safetensors file the 8-byte length and JSON
    header, then each non-empty tensor in the order of its bytes; otherwise the whole file."""
    size = path.stat().st_size
    whole = [Span(0, size)]
    if not path.name.endswith(".safetensors") or size < 8:
        return whole
    with path.open("rb") as file:
        header_bytes = int.from_bytes(file.read(8), "little")
        if not 0 < header_bytes <= min(size - 8, _MAX_CUT_HEADER_BYTES):
            return whole
        try:
            header = json.loads(file.read(header_bytes))
        except (ValueError, RecursionError):
            return whole
    if not isinstance(header, dict):
        return whole
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            return whole
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    start = data_start = 8 + header_bytes
    spans = [Span(0, data_start)]
    for begin, end, name in ranges:
        # The safetensors format: tensors tile the data exactly, no holes, no overlaps.
        if data_start + begin != start or end < begin:
            return whole
        if end > begin:
            spans.append(Span(start, end - begin, name))
        start = data_start + end
    return spans if start == size else whole


def cut_file(path: Path) -> CutFile:
    """`path`'s digest, size and segments, read once."""
    whole = hashlib.sha256()
    segments = []
    with path.open("rb") as file:
        for span in cut_points(path):
            digest = hashlib.sha256()
            left = span.size
            while left:
                chunk = file.read(min(left, _READ_CHUNK))
                if not chunk:
                    raise ValueError(f"{path} shrank while being read")
                digest.update(chunk)
                whole.update(chunk)
                left -= len(chunk)
            segments.append(Segment(digest.hexdigest(), span.size, span.tensor))
    size = sum(s.size for s in segments)
    if len(segments) == 1:  # one segment is the file itself
        segments = [Segment(whole.hexdigest(), size)]
    return CutFile(whole.hexdigest(), size, tuple(segments))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SegmentRef(_Strict):
    sha256: Sha256Hex
    size: int = Field(ge=0)


class FileLayout(_Strict):
    """One package file: its digest and size, and the segments it is the concatenation of."""

    sha256: Sha256Hex
    size: int = Field(ge=0)
    segments: list[SegmentRef] = Field(min_length=1)

    @classmethod
    def of(cls, cut: CutFile) -> FileLayout:
        return cls(
            sha256=cut.sha256,
            size=cut.size,
            segments=[SegmentRef(sha256=s.sha256, size=s.size) for s in cut.segments],
        )


class PackageLayout(_Strict):
    """`layout.json` of a delta upload: every file of the package, by name."""

    files: dict[str, FileLayout]

    def unknown_files(self) -> list[str]:
        return sorted(set(self.files) - set(PACKAGE_FILES))


class MissingRequest(_Strict):
    """`POST /api/v1/blobs/missing`: which of these digests does the catalog lack?"""

    sha256: list[Sha256Hex] = Field(max_length=10_000)


class MissingReply(_Strict):
    missing: list[str]
