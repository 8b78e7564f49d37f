"""The Flower reply carries an expert package that the server re-creates bit-exactly."""

import hashlib

import pytest
import torch

from client.flower_message import PACKAGE_RECORD, package_to_content
from coordinator.flower_server import PackageMessageError, write_package_from_content
from protocol import ADAPTER_WEIGHTS_FILE, PACKAGE_FILES, ROUTER_FILE
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama


@pytest.fixture
def package_dir(tmp_path):
    expert = random_expert(tiny_llama(), name="wire", rank=2, seed=1, with_average_activation=True)
    expert = expert.with_retrieval_embeddings(torch.randn(3, 384))
    return expert.save(tmp_path / "package")


def test_every_package_file_is_recreated_bit_exactly(package_dir, tmp_path):
    content = package_to_content(package_dir)

    written = write_package_from_content(content, tmp_path / "received")

    assert sorted(written) == sorted(PACKAGE_FILES)
    for name, path in written.items():
        assert path.read_bytes() == (package_dir / name).read_bytes(), name


def test_the_tensors_travel_as_arrays_not_as_files(package_dir):
    content = package_to_content(package_dir)

    router = content.array_records[ROUTER_FILE]
    gate = router["model.layers.0.self_attn.q_proj.gate"]
    assert gate.dtype == "F32"
    assert gate.shape == (32,)  # the tiny model's hidden size
    assert set(content.array_records) == {
        ADAPTER_WEIGHTS_FILE,
        ROUTER_FILE,
        "retrieval.safetensors",
    }


def test_a_tampered_array_is_refused_with_the_file_named(package_dir, tmp_path):
    content = package_to_content(package_dir)
    router = content.array_records[ROUTER_FILE]
    key = next(iter(router))
    array = router[key]
    flipped = bytes([array.data[0] ^ 1]) + array.data[1:]
    router[key] = type(array)(dtype=array.dtype, shape=array.shape, stype=array.stype, data=flipped)

    with pytest.raises(
        PackageMessageError, match=r"router\.safetensors: re-created file has sha256"
    ):
        write_package_from_content(content, tmp_path / "received")


def test_the_declared_hashes_are_the_senders_files(package_dir):
    content = package_to_content(package_dir)

    declared = content.config_records[PACKAGE_RECORD][f"{ADAPTER_WEIGHTS_FILE}.sha256"]
    assert declared == hashlib.sha256((package_dir / ADAPTER_WEIGHTS_FILE).read_bytes()).hexdigest()
