"""Cutting package files into segments (protocol.segments)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from protocol.segments import FileLayout, PackageLayout, cut_file, cut_points


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _raw(path: Path, header: dict[str, object], data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_a_safetensors_file_is_its_header_then_each_tensor(tmp_path):
    tensors = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3),
        "a": np.ones(4, dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = _safetensors(tmp_path / "x.safetensors", tensors)
    data = path.read_bytes()

    spans = cut_points(path)
    cut = cut_file(path)

    # The header, then the two non-empty tensors in the order of their bytes.
    assert spans[0].offset == 0 and spans[0].tensor == ""
    assert sorted(s.tensor for s in spans[1:]) == ["a", "b"]
    assert b"".join(data[s.offset : s.offset + s.size] for s in spans) == data
    assert cut.sha256 == hashlib.sha256(data).hexdigest() and cut.size == len(data)
    for span, segment in zip(spans, cut.segments, strict=True):
        assert (
            segment.sha256
            == hashlib.sha256(data[span.offset : span.offset + span.size]).hexdigest()
        )
        assert segment.tensor == span.tensor
    # Each tensor's segment is its raw bytes, whatever file holds it.
    b = next(s for s in cut.segments if s.tensor == "b")
    assert b.sha256 == hashlib.sha256(tensors["b"].tobytes()).hexdigest()


def test_the_same_tensor_in_two_files_is_the_same_segment(tmp_path):
    shared = np.linspace(0, 1, 64, dtype=np.float32)
    one = cut_file(
        _safetensors(tmp_path / "1.safetensors", {"w": shared, "g": np.zeros(3, np.float32)})
    )
    two = cut_file(
        _safetensors(tmp_path / "2.safetensors", {"w": shared, "g": np.ones(3, np.float32)})
    )

    assert one.sha256 != two.sha256
    by_tensor = [{s.tensor: s.sha256 for s in cut.segments} for cut in (one, two)]
    assert by_tensor[0]["w"] == by_tensor[1]["w"]
    assert by_tensor[0]["g"] != by_tensor[1]["g"]


@pytest.mark.parametrize(
    ("name", "header", "data"),
    [
        ("hole.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"xyz"),
        ("tail.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"xyz"),
        (
            "overlap.safetensors",
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"xyz",
        ),
        ("offsets.safetensors", {"a": {"dtype": "U8", "shape": [2], "data_offsets": "0-2"}}, b"xy"),
        ("list.safetensors", [1, 2], b""),
    ],
)
def test_a_file_that_is_not_well_formed_is_one_segment(tmp_path, name, header, data):
    path = _raw(tmp_path / name, header, data)
    cut = cut_file(path)
    assert cut_points(path) == [cut_points(path)[0]] and cut_points(path)[0].size == len(
        path.read_bytes()
    )
    assert [s.sha256 for s in cut.segments] == [cut.sha256]


def test_non_safetensors_files_and_garbage_are_one_segment(tmp_path):
    (tmp_path / "expert.json").write_text('{"name": "x"}')
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    for name in ("expert.json", "junk.safetensors", "short.safetensors"):
        cut = cut_file(tmp_path / name)
        assert len(cut.segments) == 1 and cut.segments[0].sha256 == cut.sha256


def test_a_layout_describes_a_cut_file_and_refuses_what_is_not_one(tmp_path):
    cut = cut_file(_safetensors(tmp_path / "router.safetensors", {"g": np.ones(3, np.float32)}))
    layout = PackageLayout(files={"router.safetensors": FileLayout.of(cut)})
    again = PackageLayout.model_validate_json(layout.model_dump_json())
    assert (
        again == layout
        and sum(s.size for s in again.files["router.safetensors"].segments) == cut.size
    )
    assert PackageLayout(files={"notes.txt": FileLayout.of(cut)}).unknown_files() == ["notes.txt"]
    with pytest.raises(ValueError):
        PackageLayout.model_validate(
            {"files": {"router.safetensors": {"sha256": "XY", "size": 1, "segments": []}}}
        )
