"""Hostile uploads for the fuzz tests: hypothesis strategies that start from a valid expert
package and break it at every layer (multipart body, file names, JSON, safetensors framing,
headers, tensor values) the way an untrusted contributor could.

`upload_cases(package)` draws an `UploadCase`: the raw multipart body (built by hand, so
file names with NUL, quotes or CR/LF reach the server as sent), its headers, and a label
naming the attack. `benchmarks/fuzz_long.py` runs the same strategies for 10,000+ cases.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import load, save

from protocol import PACKAGE_FILES
from protocol.limits import AdmissionLimits
from protocol.package import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    RETRIEVAL_FILE,
    ROUTER_FILE,
)

BOUNDARY = "fuzzboundary7MA4YWxkTrZu0gW"
SAFETENSORS_FILES = (ADAPTER_WEIGHTS_FILE, ROUTER_FILE)
JSON_FILES = (MANIFEST_FILE, ADAPTER_CONFIG_FILE)

# Small admission limits, so that oversized files and bodies are cheap to send.
FUZZ_LIMITS = AdmissionLimits(
    max_json_bytes=64 * 1024,
    max_adapter_bytes=256 * 1024,
    max_router_bytes=64 * 1024,
    max_retrieval_bytes=64 * 1024,
    max_total_bytes=512 * 1024,
    max_header_bytes=32 * 1024,
)

HOSTILE_NAMES = [
    "../expert.json",
    "../../../../etc/passwd",
    "/etc/passwd",
    "/tmp/router.safetensors",
    "C:\\Windows\\win.ini",
    "..\\adapter_model.safetensors",
    "expert.json\x00.png",
    "\x00",
    "",
    ".",
    "..",
    "expert.json/",
    "./expert.json",
    "EXPERT.JSON",
    "expert.json ",
    "router.safetensors\r\nX-Injected: 1",
    'a"b.json',
    "x" * 4096,
    "ルーター.safetensors",
    "expert\u202ejson",
    "expert.\udcff.json",
    ".tmp-upload-evil",
    "blobs/ab/" + "0" * 62,
]

DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "BOOL",
    "F8_E4M3",
    "XYZ",
    "",
]


@dataclass
class UploadCase:
    label: str
    files: dict[str, bytes] | None  # the package as sent, when the body is a clean multipart
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def read_package(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- multipart -------------------------------------------------------------------------


def _part(field_name: bytes, filename: bytes | None, data: bytes) -> bytes:
    disposition = b'form-data; name="' + field_name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return (
        b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    )


def multipart(parts: Sequence[tuple[bytes, bytes | None, bytes]]) -> bytes:
    return b"".join(_part(*p) for p in parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def _headers() -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def clean_case(label: str, files: dict[str, bytes]) -> UploadCase:
    body = multipart([(b"files", name.encode(), data) for name, data in files.items()])
    return UploadCase(label, dict(files), body, _headers())


def _raw_case(label: str, parts: Sequence[tuple[bytes, bytes | None, bytes]]) -> UploadCase:
    return UploadCase(label, None, multipart(parts), _headers())


# --- safetensors -----------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict[str, object], bytes]:
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_safetensors(header: object, payload: bytes, *, pad: bool = True) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def _tensor_names(header: dict[str, object]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
hostile_text = st.sampled_from(HOSTILE_NAMES) | st.text(max_size=40)
big_ints = st.sampled_from([0, -1, 1, 2**31, 2**32 - 1, 2**53, 2**63 - 1, 2**64 - 1, 2**64, 10**30])


@st.composite
def header_attack(draw: st.DrawFn, data: bytes) -> tuple[str, bytes]:
    """A structurally broken safetensors header over the original data."""
    header, payload = split_safetensors(data)
    names = _tensor_names(header)
    name = draw(st.sampled_from(names))
    entry = dict(header[name])  # type: ignore[call-overload]
    kind = draw(
        st.sampled_from(
            [
                "overlap",
                "out_of_range",
                "offsets",
                "huge_shape",
                "shape",
                "dtype",
                "rename",
                "drop",
                "extra",
                "not_object",
                "metadata",
                "entry_junk",
                "duplicate_key",
                "length_prefix",
                "unpadded_garbage",
            ]
        )
    )
    if kind == "overlap":
        other = draw(st.sampled_from(names))
        entry["data_offsets"] = list(header[other]["data_offsets"])  # type: ignore[index]
        start, _end = entry["data_offsets"]
        shift = draw(st.integers(min_value=-64, max_value=64))
        entry["data_offsets"] = [max(0, start + shift), max(0, start + shift) + _nbytes(entry)]
    elif kind == "out_of_range":
        start = draw(st.sampled_from([len(payload), len(payload) - 4, 2**40, 2**63]))
        entry["data_offsets"] = [start, start + _nbytes(entry)]
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.lists(big_ints | st.integers(-10, 10**6), min_size=0, max_size=3) | json_values
        )
    elif kind == "huge_shape":
        entry["shape"] = draw(
            st.lists(
                st.sampled_from([2**16, 2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1]),
                min_size=1,
                max_size=4,
            )
        )
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(-2, 300), max_size=4) | json_values)
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
    elif kind == "rename":
        header[draw(hostile_text | st.sampled_from([n + "x" for n in names]))] = header.pop(name)
        return f"header_{kind}", join_safetensors(header, payload)
    elif kind == "drop":
        del header[name]
        return f"header_{kind}", join_safetensors(header, payload)
    elif kind == "extra":
        header[name + ".extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        return f"header_{kind}", join_safetensors(header, payload)
    elif kind == "not_object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return f"header_{kind}", join_safetensors(value, payload)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_values)
        return f"header_{kind}", join_safetensors(header, payload)
    elif kind == "entry_junk":
        entry[draw(st.text(max_size=8))] = draw(json_values)
        if draw(st.booleans()):
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    elif kind == "duplicate_key":
        text = json.dumps(header).encode()
        dup = json.dumps({name: header[name]}).encode()[1:-1]
        text = text[:-1] + b", " + dup + b"}"
        return f"header_{kind}", join_safetensors(text, payload)
    elif kind == "length_prefix":
        length = draw(big_ints | st.integers(0, len(data) + 16))
        return f"header_{kind}", struct.pack("<Q", length % 2**64) + data[8:]
    elif kind == "unpadded_garbage":
        text = json.dumps(header).encode() + draw(st.binary(min_size=1, max_size=16))
        return f"header_{kind}", join_safetensors(text, payload, pad=False)
    header[name] = entry
    return f"header_{kind}", join_safetensors(header, payload)


def _nbytes(entry: dict[str, object]) -> int:
    shape = entry.get("shape")
    size = 4
    if isinstance(shape, list) and all(isinstance(s, int) for s in shape):
        size *= math.prod(shape)
    return int(size)


@st.composite
def value_attack(draw: st.DrawFn, filename: str, data: bytes) -> tuple[str, bytes]:
    """A well-formed file with hostile values: NaN/inf, wrong dtypes, poisoned scales."""
    tensors = {k: v.copy() for k, v in load(data).items()}
    name = draw(st.sampled_from(sorted(tensors)))
    array = tensors[name]
    kind = draw(st.sampled_from(["nonfinite", "dtype", "scale", "constant", "shape", "empty"]))
    if kind == "nonfinite":
        flat = array.reshape(-1)
        index = draw(st.integers(0, flat.size - 1))
        flat[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["float64", "int32", "int8", "uint8", "bool", "int64"]))
        if filename == ROUTER_FILE:
            dtype = draw(st.sampled_from([dtype, "float16"]))
        tensors[name] = array.astype(dtype)
    elif kind == "scale":
        factor = draw(st.sampled_from([1e3, 1e6, 1e30, -1e6, 3.0e38]))
        with np.errstate(over="ignore"):
            tensors[name] = (array.astype(np.float64) * factor).astype(array.dtype)
    elif kind == "constant":
        tensors[name] = np.full_like(array, draw(st.sampled_from([0.0, 1.0, -3.5])))
    elif kind == "shape":
        tensors[name] = np.zeros(
            draw(st.lists(st.integers(0, 70), min_size=0, max_size=3)), dtype=array.dtype
        )
    elif kind == "empty":
        tensors = {}
    return f"values_{kind}", save(tensors)


def _foreign_file() -> st.SearchStrategy[tuple[str, bytes]]:
    def zipped() -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}))
            archive.writestr("archive/version", "3")
        return buffer.getvalue()

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled!",))

    return st.sampled_from(
        [
            ("pickle", pickle.dumps({"weight": list(range(10))}, protocol=2)),
            ("pickle_reduce", pickle.dumps(Boom())),
            ("zip", zipped()),
            ("empty", b""),
            ("gzip", b"\x1f\x8b\x08\x00" + b"\x00" * 32),
            ("json", b'{"a": 1}'),
            ("npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, "),
        ]
    ) | st.binary(max_size=256).map(lambda b: ("random", b))


@st.composite
def json_attack(draw: st.DrawFn, filename: str, data: bytes) -> tuple[str, bytes]:
    document = json.loads(data)
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "replace_field",
                "drop_field",
                "unknown_field",
                "not_object",
                "nan",
                "duplicate_key",
                "bad_utf8",
                "bom",
                "deep",
                "hostile_name",
                "lone_surrogate",
                "huge_number",
            ]
        )
    )
    if kind == "truncate":
        return "json_truncate", data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "replace_field":
        key = draw(st.sampled_from(sorted(document)))
        document[key] = draw(json_values | hostile_text)
    elif kind == "drop_field":
        document.pop(draw(st.sampled_from(sorted(document))))
    elif kind == "unknown_field":
        document[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in document))] = 1
    elif kind == "not_object":
        return "json_not_object", json.dumps(
            draw(json_values.filter(lambda v: not isinstance(v, dict)))
        ).encode()
    elif kind == "nan":
        key = draw(st.sampled_from(sorted(document)))
        text = json.dumps({**document, key: 0.5})
        return "json_nan", text.replace(
            "0.5", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        ).encode()
    elif kind == "duplicate_key":
        key = draw(st.sampled_from(sorted(document)))
        text = json.dumps(document)
        return "json_duplicate_key", (text[:-1] + f", {json.dumps(key)}: null}}").encode()
    elif kind == "bad_utf8":
        position = draw(st.integers(0, len(data)))
        return "json_bad_utf8", data[:position] + b"\xff\xfe\xc0" + data[position:]
    elif kind == "bom":
        return "json_bom", b"\xef\xbb\xbf" + data
    elif kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 5000, 20000]))
        return "json_deep", b"[" * depth + b"]" * depth
    elif kind == "hostile_name":
        field_name = "name" if filename == MANIFEST_FILE else "target_modules"
        value = draw(hostile_text)
        document[field_name] = value if filename == MANIFEST_FILE else [value]
    elif kind == "lone_surrogate":
        key = draw(st.sampled_from(sorted(document)))
        document[key] = "x\ud800"
    elif kind == "huge_number":
        key = draw(st.sampled_from(sorted(document)))
        return "json_huge_number", json.dumps({**document, key: 0}).replace(
            ": 0", ": 1" + "0" * draw(st.sampled_from([20, 400, 5000])), 1
        ).encode()
    return f"json_{kind}", json.dumps(document, ensure_ascii=draw(st.booleans())).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def upload_cases(draw: st.DrawFn, package: dict[str, bytes]) -> UploadCase:
    """One hostile upload derived from the valid `package`."""
    layer = draw(
        st.sampled_from(
            ["safetensors_bytes", "header", "values", "foreign", "json", "multipart", "size"]
        )
    )
    files = dict(package)
    if layer == "safetensors_bytes":
        target = draw(st.sampled_from(SAFETENSORS_FILES))
        data = files[target]
        kind = draw(st.sampled_from(["truncate", "corrupt_header", "corrupt_any", "append"]))
        if kind == "truncate":
            files[target] = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "append":
            files[target] = data + draw(st.binary(min_size=1, max_size=64))
        else:
            header_end = 8 + struct.unpack("<Q", data[:8])[0]
            end = header_end if kind == "corrupt_header" else len(data)
            buffer = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                buffer[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
            files[target] = bytes(buffer)
        return clean_case(f"safetensors_{kind}", files)
    if layer == "header":
        target = draw(st.sampled_from(SAFETENSORS_FILES))
        label, files[target] = draw(header_attack(files[target]))
        return clean_case(label, files)
    if layer == "values":
        target = draw(st.sampled_from(SAFETENSORS_FILES))
        label, files[target] = draw(value_attack(target, files[target]))
        return clean_case(label, files)
    if layer == "foreign":
        target = draw(st.sampled_from([*SAFETENSORS_FILES, RETRIEVAL_FILE]))
        label, files[target] = draw(_foreign_file())
        return clean_case(f"foreign_{label}", files)
    if layer == "json":
        target = draw(st.sampled_from(JSON_FILES))
        label, files[target] = draw(json_attack(target, files[target]))
        return clean_case(label, files)
    if layer == "size":
        return draw(size_attack(files))
    return draw(multipart_attack(files))


@st.composite
def size_attack(draw: st.DrawFn, files: dict[str, bytes]) -> UploadCase:
    kind = draw(st.sampled_from(["file_over_limit", "total_over_limit", "declared_length"]))
    if kind == "file_over_limit":
        target = draw(st.sampled_from(sorted(files)))
        limit = FUZZ_LIMITS.max_file_bytes(target)
        files[target] = files[target] + b" " * (
            limit - len(files[target]) + draw(st.integers(1, 4096))
        )
        return clean_case("size_file_over_limit", files)
    if kind == "total_over_limit":
        # Files each under their limit, but the body over the total (a part repeated).
        return _raw_case(
            "size_total_over_limit",
            [(b"files", n.encode(), d) for n, d in files.items()]
            + [(b"files", ADAPTER_WEIGHTS_FILE.encode(), b"\x00" * FUZZ_LIMITS.max_adapter_bytes)]
            * 3,
        )
    case = clean_case("size_declared_length", files)
    case.headers["Content-Length"] = str(
        draw(st.sampled_from([2**40, 10**18, FUZZ_LIMITS.max_total_bytes * 2]))
    )
    return case


@st.composite
def multipart_attack(draw: st.DrawFn, files: dict[str, bytes]) -> UploadCase:
    parts: list[tuple[bytes, bytes | None, bytes]] = [
        (b"files", name.encode(), data) for name, data in files.items()
    ]
    kind = draw(
        st.sampled_from(
            [
                "missing_file",
                "duplicate_file",
                "unknown_file",
                "hostile_filename",
                "wrong_field",
                "no_filename",
                "truncated_body",
                "garbage_body",
                "content_type",
                "empty_body",
                "only_retrieval",
            ]
        )
    )
    if kind == "missing_file":
        index = draw(st.integers(0, len(parts) - 1))
        return _raw_case("multipart_missing_file", parts[:index] + parts[index + 1 :])
    if kind == "duplicate_file":
        return _raw_case("multipart_duplicate_file", [*parts, draw(st.sampled_from(parts))])
    if kind == "unknown_file":
        name = draw(st.text(min_size=1, max_size=30).filter(lambda n: n not in PACKAGE_FILES))
        return _raw_case(
            "multipart_unknown_file",
            [*parts, (b"files", name.encode("utf-8", "surrogatepass"), b"data")],
        )
    if kind == "hostile_filename":
        index = draw(st.integers(0, len(parts) - 1))
        hostile = draw(st.sampled_from(HOSTILE_NAMES)).encode("utf-8", "surrogatepass")
        parts[index] = (b"files", hostile, parts[index][2])
        return _raw_case("multipart_hostile_filename", parts)
    if kind == "wrong_field":
        index = draw(st.integers(0, len(parts) - 1))
        field_name = draw(st.sampled_from([b"file", b"", b"../x", b"router.safetensors\x00"]))
        if field_name == parts[index][1]:
            field_name = b"other"
        parts[index] = (field_name, parts[index][1], parts[index][2])
        return _raw_case("multipart_wrong_field", parts)
    if kind == "no_filename":
        index = draw(st.integers(0, len(parts) - 1))
        parts[index] = (b"files", None, parts[index][2])
        return _raw_case("multipart_no_filename", parts)
    if kind == "truncated_body":
        body = multipart(parts)
        # At least "-\r\n" of the closing delimiter goes: the body is really incomplete
        # (without only its final CRLF, a multipart body is complete: RFC 2046).
        cut = draw(st.integers(0, len(body) - 3))
        return UploadCase("multipart_truncated_body", None, body[:cut], _headers())
    if kind == "garbage_body":
        return UploadCase("multipart_garbage_body", None, draw(st.binary(max_size=512)), _headers())
    if kind == "content_type":
        content_type = draw(
            st.sampled_from(
                [
                    "application/json",
                    "multipart/form-data",
                    "multipart/form-data; boundary=",
                    "multipart/mixed; boundary=" + BOUNDARY,
                    "text/plain",
                    "multipart/form-data; boundary=wrong",
                ]
            )
        )
        case = clean_case("multipart_content_type", files)
        case.headers["Content-Type"] = content_type
        case.files = None
        return case
    if kind == "empty_body":
        return UploadCase(
            "multipart_empty_body", None, b"--" + BOUNDARY.encode() + b"--\r\n", _headers()
        )
    return _raw_case(
        "multipart_only_retrieval", [(b"files", RETRIEVAL_FILE.encode(), b"\x00" * 16)]
    )
