"""Admission of expert packages: a real package passes, each kind of bad input is refused
with the check, the file, the tensor and what was expected."""

import hashlib
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from protocol import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
    RETRIEVAL_FILE,
    ROUTER_FILE,
    BaseModelSpec,
)
from protocol.limits import AdmissionLimits
from protocol.validation import (
    PackageRejected,
    ValidatedPackage,
    lora_update_norm,
    package_digest,
    validate_directory,
    validate_package,
)
from tests.protocol.packages import (
    base_spec,
    edit_adapter_config,
    edit_json,
    edit_tensors,
    raw_safetensors,
    write_package,
)
from tests.tiny import tiny_llama, tiny_t5

Q0 = "model.layers.0.self_attn.q_proj"
Q0_A = f"base_model.model.{Q0}.lora_A.weight"
Q0_B = f"base_model.model.{Q0}.lora_B.weight"
DOWN1 = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def base() -> BaseModelSpec:
    return base_spec(tiny_llama())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, base: BaseModelSpec) -> Path:
    """One package with every optional part, written once by PEFT for the whole module."""
    directory = tmp_path_factory.mktemp("pristine") / "expert"
    return write_package(directory, tiny_llama(), base, retrieval_examples=5)


@pytest.fixture
def package(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine package for a test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "expert"))


def rejection(
    package: Path,
    base: BaseModelSpec,
    limits: AdmissionLimits | None = None,
    namespace: str | None = None,
) -> PackageRejected:
    with pytest.raises(PackageRejected) as info:
        validate_directory(package, base, limits or AdmissionLimits(), namespace=namespace)
    return info.value


def assert_rejected(
    error: PackageRejected,
    check: str,
    file: str | None,
    tensor: str | None = None,
    expected: str | None = None,
) -> None:
    assert (error.check, error.file, error.tensor) == (check, file, tensor), error.message
    assert error.expected is not None
    assert f"expected {error.expected}" in error.message
    if expected is not None:
        assert expected in error.expected, error.expected
    if file is not None:
        assert error.message.startswith(file)


# --- a valid package ---------------------------------------------------------------------


def test_a_package_written_by_peft_is_accepted(package: Path, base: BaseModelSpec) -> None:
    result = validate_directory(package, base, namespace="alice")

    assert isinstance(result, ValidatedPackage)
    assert result.module_paths == tuple(
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert (result.rank, result.lora_alpha, result.scale) == (4, 8.0, 2.0)
    assert result.has_average_activation and result.has_retrieval
    assert result.retrieval_examples == 5
    assert result.manifest.name == "alice/tiny-expert"
    assert result.adapter_config["peft_type"] == "LORA"
    # Every file is stored as uploaded except the adapter config, stored canonically.
    stored = {p.name: p.read_bytes() for p in package.iterdir()}
    stored[ADAPTER_CONFIG_FILE] = result.canonical_adapter_config
    for name, digest in result.file_sha256.items():
        assert digest == hashlib.sha256(stored[name]).hexdigest()
    assert result.total_bytes == sum(len(data) for data in stored.values())
    assert result.digest == package_digest(result.file_sha256)


def test_optional_parts_may_be_left_out(package: Path, base: BaseModelSpec) -> None:
    (package / RETRIEVAL_FILE).unlink()
    edit_tensors(
        package / ROUTER_FILE,
        lambda t: [t.pop(k) for k in list(t) if k.endswith(".average_activation")],
    )
    edit_json(
        package / MANIFEST_FILE,
        lambda m: m.update(has_average_activation=False, has_retrieval_embeddings=False),
    )

    result = validate_directory(package, base)

    assert not result.has_average_activation and not result.has_retrieval
    assert set(result.file_sha256) == {
        ADAPTER_CONFIG_FILE,
        ADAPTER_WEIGHTS_FILE,
        ROUTER_FILE,
        MANIFEST_FILE,
    }


def test_a_bare_slug_is_accepted_in_any_namespace(package: Path, base: BaseModelSpec) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m.update(name="tiny-expert"))
    assert validate_directory(package, base, namespace="bob").manifest.name == "tiny-expert"


def test_uploads_under_temporary_names_are_judged_by_their_package_names(
    package: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    uploads = {}
    for i, path in enumerate(sorted(package.iterdir())):
        uploads[path.name] = path.rename(tmp_path / f"upload-{i}.part")
    assert validate_package(uploads, base).rank == 4

    uploads[ROUTER_FILE].write_bytes(b"not a safetensors file at all")
    with pytest.raises(PackageRejected) as info:
        validate_package(uploads, base)
    assert_rejected(info.value, "not_safetensors", ROUTER_FILE)


def test_the_update_norm_equals_the_norm_of_the_full_product() -> None:
    rng = np.random.default_rng(0)
    lora_a = rng.standard_normal((4, 48)).astype(np.float32)
    lora_b = rng.standard_normal((40, 4)).astype(np.float16)
    naive = np.linalg.norm(1.5 * lora_b.astype(np.float64) @ lora_a.astype(np.float64))
    assert lora_update_norm(lora_a, lora_b, 1.5) == pytest.approx(naive, rel=1e-12)


def test_the_package_digest_depends_on_contents_not_order() -> None:
    files = {"b.json": "22", "a.json": "11"}
    lines = b"a.json:11\nb.json:22\n"
    assert package_digest(files) == "sha256:" + hashlib.sha256(lines).hexdigest()
    assert package_digest(dict(reversed(files.items()))) == package_digest(files)
    assert package_digest({**files, "a.json": "12"}) != package_digest(files)


def test_a_rejection_is_a_json_body(package: Path, base: BaseModelSpec) -> None:
    (package / ROUTER_FILE).unlink()
    body = rejection(package, base).to_dict()
    assert json.loads(json.dumps(body)) == body
    assert body["check"] == "missing_file" and body["file"] == ROUTER_FILE
    assert set(body) == {"error", "check", "file", "tensor", "expected", "message"}


# --- files and sizes ---------------------------------------------------------------------


def test_a_missing_file_is_rejected(package: Path, base: BaseModelSpec) -> None:
    (package / ROUTER_FILE).unlink()
    assert_rejected(rejection(package, base), "missing_file", ROUTER_FILE, expected=ROUTER_FILE)


def test_an_unknown_file_is_rejected(package: Path, base: BaseModelSpec) -> None:
    (package / "README.md").write_text("# my expert")
    assert_rejected(
        rejection(package, base), "unknown_file", "README.md", expected=ADAPTER_CONFIG_FILE
    )


def test_an_oversize_file_is_rejected(package: Path, base: BaseModelSpec) -> None:
    limits = AdmissionLimits(max_router_bytes=100)
    assert_rejected(
        rejection(package, base, limits), "too_large", ROUTER_FILE, expected="at most 100 bytes"
    )


def test_an_oversize_package_is_rejected(package: Path, base: BaseModelSpec) -> None:
    limits = AdmissionLimits(max_total_bytes=1000)
    assert_rejected(rejection(package, base, limits), "too_large", None, expected="at most 1000")


# --- the manifest ------------------------------------------------------------------------


def test_a_manifest_that_is_not_json_is_rejected(package: Path, base: BaseModelSpec) -> None:
    (package / MANIFEST_FILE).write_text('{"name": "alice/x",')
    assert_rejected(rejection(package, base), "not_json", MANIFEST_FILE, expected="JSON object")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(name="Alice's Expert!"), "name"),
        (lambda m: m.pop("library_version"), "library_version"),
        (lambda m: m["base_model"].update(fingerprint="md5:abc"), "base_model.fingerprint"),
    ],
    ids=["bad-name", "missing-field", "bad-fingerprint"],
)
def test_a_manifest_schema_error_names_the_field(
    package: Path, base: BaseModelSpec, edit, field: str
) -> None:
    edit_json(package / MANIFEST_FILE, edit)
    error = rejection(package, base)
    assert_rejected(error, "manifest_schema", MANIFEST_FILE)
    assert f"field '{field}'" in error.message


def test_an_unsupported_format_version_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m.update(format_version=2))
    assert_rejected(
        rejection(package, base), "format_version", MANIFEST_FILE, expected="format_version 1"
    )


def test_another_base_model_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m["base_model"].update(name="gpt2"))
    assert_rejected(rejection(package, base), "base_model", MANIFEST_FILE, expected="'tiny-llama'")


def test_a_fingerprint_mismatch_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_json(
        package / MANIFEST_FILE, lambda m: m["base_model"].update(fingerprint="sha256:" + "0" * 64)
    )
    assert_rejected(
        rejection(package, base), "fingerprint", MANIFEST_FILE, expected=base.fingerprint
    )


def test_a_foreign_namespace_is_rejected(package: Path, base: BaseModelSpec) -> None:
    assert_rejected(
        rejection(package, base, namespace="bob"),
        "namespace",
        MANIFEST_FILE,
        expected="'bob/<slug>'",
    )


def test_a_manifest_that_misstates_the_config_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m["lora"].update(r=16))
    assert_rejected(
        rejection(package, base), "manifest_mismatch", MANIFEST_FILE, expected="lora.r 4"
    )


def test_a_manifest_that_misstates_the_router_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    edit_json(package / MANIFEST_FILE, lambda m: m.update(has_average_activation=False))
    assert_rejected(
        rejection(package, base),
        "manifest_mismatch",
        MANIFEST_FILE,
        expected="has_average_activation true",
    )


# --- the adapter config ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"peft_type": "IA3"}, 'peft_type "LORA"'),
        ({"r": 4.5}, "positive integer"),
        ({"lora_alpha": 0}, "positive number"),
        ({"target_modules": ".*q_proj"}, "a list of module names"),
        ({"target_modules": ["embed_tokens"]}, "q_proj"),
        ({"bias": "all"}, 'bias null, false, empty or "none"'),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights true"),
        ({"task_type": "SEQ_2_SEQ_LM"}, 'task_type "CAUSAL_LM"'),
        ({"some_future_option": {"on": True}}, "some_future_option"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_an_adapter_config_that_is_not_plain_lora_is_rejected(
    package: Path, base: BaseModelSpec, changes: dict, expected: str
) -> None:
    edit_adapter_config(package, **changes)
    assert_rejected(rejection(package, base), "peft_config", ADAPTER_CONFIG_FILE, expected=expected)


def test_a_rank_above_the_limit_is_rejected(package: Path, base: BaseModelSpec) -> None:
    assert_rejected(
        rejection(package, base, AdmissionLimits(max_rank=2)),
        "rank",
        ADAPTER_CONFIG_FILE,
        expected="r at most 2",
    )


def test_rank_stabilised_scaling_is_understood(package: Path, base: BaseModelSpec) -> None:
    edit_adapter_config(package, use_rslora=True)
    assert validate_directory(package, base).scale == pytest.approx(8 / 2)


# --- files that are not safetensors ------------------------------------------------------


def torch_pickle() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("data.pkl", pickle.dumps({"weight": [0.0, 0.0]}))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "contents",
    [
        pytest.param(lambda valid: valid[: len(valid) - 7], id="truncated"),
        pytest.param(lambda valid: valid[:5], id="shorter-than-a-header-length"),
        pytest.param(lambda valid: np.random.default_rng(0).bytes(4096), id="random-bytes"),
        pytest.param(lambda valid: zip_archive(), id="zip"),
        pytest.param(lambda valid: pickle.dumps({"weight": [0.0]}), id="pickle"),
        pytest.param(lambda valid: torch_pickle(), id="torch-save"),
        pytest.param(
            lambda valid: raw_safetensors(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                bytes(12),
            ),
            id="overlapping-offsets",
        ),
        pytest.param(lambda valid: raw_safetensors(b"[1, 2, 3]", b""), id="header-not-object"),
    ],
)
def test_a_file_that_is_not_safetensors_is_rejected(
    package: Path, base: BaseModelSpec, contents
) -> None:
    path = package / ADAPTER_WEIGHTS_FILE
    path.write_bytes(contents(path.read_bytes()))
    assert_rejected(
        rejection(package, base), "not_safetensors", ADAPTER_WEIGHTS_FILE, expected="safetensors"
    )


def test_a_header_naming_a_tensor_twice_is_rejected(package: Path, base: BaseModelSpec) -> None:
    # Both entries are valid on their own; readers disagree on which one wins.
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"embeddings": {entry}, "embeddings": {entry}}}'.encode()
    (package / RETRIEVAL_FILE).write_bytes(raw_safetensors(header, bytes(4)))
    assert_rejected(
        rejection(package, base),
        "not_safetensors",
        RETRIEVAL_FILE,
        tensor="embeddings",
        expected="each tensor named once",
    )


def test_an_oversize_safetensors_header_is_rejected(package: Path, base: BaseModelSpec) -> None:
    assert_rejected(
        rejection(package, base, AdmissionLimits(max_header_bytes=64)),
        "too_large",
        ADAPTER_WEIGHTS_FILE,
        expected="at most 64 bytes",
    )


# --- tensor names, shapes and dtypes -----------------------------------------------------


def test_a_missing_lora_b_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_tensors(package / ADAPTER_WEIGHTS_FILE, lambda t: t.pop(Q0_B))
    assert_rejected(
        rejection(package, base), "tensor_names", ADAPTER_WEIGHTS_FILE, Q0_B, expected="lora_B"
    )


def test_an_extra_adapter_tensor_is_rejected(package: Path, base: BaseModelSpec) -> None:
    # k_proj is not in target_modules: PEFT would not load it, so it must not be there.
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    edit_tensors(
        package / ADAPTER_WEIGHTS_FILE, lambda t: t.update({extra: np.zeros((4, 32), np.float32)})
    )
    assert_rejected(
        rejection(package, base), "tensor_names", ADAPTER_WEIGHTS_FILE, extra, expected="exactly"
    )


def test_a_wrong_shape_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_tensors(
        package / ADAPTER_WEIGHTS_FILE, lambda t: t.update({Q0_A: np.zeros((4, 31), np.float32)})
    )
    assert_rejected(
        rejection(package, base), "shape", ADAPTER_WEIGHTS_FILE, Q0_A, expected="shape [4, 32]"
    )


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_a_wrong_lora_dtype_is_rejected(package: Path, base: BaseModelSpec, dtype) -> None:
    edit_tensors(package / ADAPTER_WEIGHTS_FILE, lambda t: t.update({Q0_A: t[Q0_A].astype(dtype)}))
    assert_rejected(
        rejection(package, base),
        "dtype",
        ADAPTER_WEIGHTS_FILE,
        Q0_A,
        expected="dtype float32 or float16",
    )


def test_float16_lora_weights_are_accepted(package: Path, base: BaseModelSpec) -> None:
    edit_tensors(
        package / ADAPTER_WEIGHTS_FILE,
        lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}),
    )
    assert validate_directory(package, base).rank == 4


def test_bfloat16_lora_weights_are_rejected_with_advice(package: Path, base: BaseModelSpec) -> None:
    path = package / ADAPTER_WEIGHTS_FILE
    tensors = {k: v.to(torch.bfloat16) for k, v in load_torch_file(str(path)).items()}
    save_torch_file(tensors, str(path))
    error = rejection(package, base)
    assert_rejected(error, "dtype", ADAPTER_WEIGHTS_FILE, error.tensor, expected="float32")
    assert "convert to float32" in error.message


def test_a_float64_gate_is_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{Q0}.gate"
    edit_tensors(package / ROUTER_FILE, lambda t: t.update({key: t[key].astype(np.float64)}))
    assert_rejected(rejection(package, base), "dtype", ROUTER_FILE, key, expected="float32")


# --- values ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_lora_weights_are_rejected(
    package: Path, base: BaseModelSpec, bad: float
) -> None:
    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors[Q0_B][3, 1] = bad

    edit_tensors(package / ADAPTER_WEIGHTS_FILE, poison)
    error = rejection(package, base)
    assert_rejected(error, "non_finite", ADAPTER_WEIGHTS_FILE, Q0_B, expected="finite values")
    assert "1 of 128 values" in error.message


def test_a_nan_gate_is_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{DOWN1}.gate"
    edit_tensors(package / ROUTER_FILE, lambda t: t[key].__setitem__(0, np.nan))
    assert_rejected(rejection(package, base), "non_finite", ROUTER_FILE, key, expected="finite")


def test_a_gate_norm_over_the_cap_is_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{DOWN1}.gate"
    edit_tensors(package / ROUTER_FILE, lambda t: t.update({key: t[key] * 1e4}))
    assert_rejected(rejection(package, base), "gate_norm", ROUTER_FILE, key, expected="at most 100")


def test_a_constant_gate_is_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{Q0}.gate"
    edit_tensors(package / ROUTER_FILE, lambda t: t.update({key: np.zeros(32, np.float32)}))
    assert_rejected(
        rejection(package, base), "gate_constant", ROUTER_FILE, key, expected="standard deviation"
    )


def test_an_update_norm_over_the_cap_is_rejected(package: Path, base: BaseModelSpec) -> None:
    edit_tensors(package / ADAPTER_WEIGHTS_FILE, lambda t: t.update({Q0_B: t[Q0_B] * 1e6}))
    error = rejection(package, base)
    assert_rejected(error, "update_norm", ADAPTER_WEIGHTS_FILE, Q0_B, expected="at most 1000")
    assert Q0 in error.message


def test_an_average_activation_norm_over_the_cap_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    key = f"{Q0}.average_activation"
    edit_tensors(package / ROUTER_FILE, lambda t: t.update({key: np.full(32, 1e5, np.float32)}))
    assert_rejected(
        rejection(package, base), "average_activation_norm", ROUTER_FILE, key, expected="at most"
    )


# --- the router --------------------------------------------------------------------------


def test_a_missing_gate_is_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{DOWN1}.gate"
    edit_tensors(package / ROUTER_FILE, lambda t: t.pop(key))
    assert_rejected(rejection(package, base), "tensor_names", ROUTER_FILE, key, expected=".gate")


def test_partial_average_activations_are_rejected(package: Path, base: BaseModelSpec) -> None:
    key = f"{DOWN1}.average_activation"
    edit_tensors(package / ROUTER_FILE, lambda t: t.pop(key))
    assert_rejected(
        rejection(package, base),
        "tensor_names",
        ROUTER_FILE,
        key,
        expected="every adapted module or for none",
    )


# --- retrieval embeddings ----------------------------------------------------------------


def write_embeddings(package: Path, embeddings: np.ndarray) -> None:
    edit_tensors(package / RETRIEVAL_FILE, lambda t: t.update(embeddings=embeddings))


def test_too_many_retrieval_examples_are_rejected(package: Path, base: BaseModelSpec) -> None:
    write_embeddings(package, np.ones((1001, 384), np.float32))
    assert_rejected(
        rejection(package, base),
        "retrieval_examples",
        RETRIEVAL_FILE,
        "embeddings",
        expected="at most 1000",
    )


def test_retrieval_embeddings_of_the_wrong_width_are_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    write_embeddings(package, np.ones((5, 768), np.float32))
    assert_rejected(
        rejection(package, base), "shape", RETRIEVAL_FILE, "embeddings", expected="[examples, 384]"
    )


def test_a_zero_retrieval_embedding_is_rejected(package: Path, base: BaseModelSpec) -> None:
    embeddings = np.ones((5, 384), np.float32)
    embeddings[2] = 0
    write_embeddings(package, embeddings)
    error = rejection(package, base)
    assert_rejected(error, "zero_embedding", RETRIEVAL_FILE, "embeddings", expected="non-zero")
    assert "first row 2" in error.message


def test_an_encoder_decoder_package_is_accepted(tmp_path: Path) -> None:
    t5_base = base_spec(tiny_t5(), name="tiny-t5")
    package = write_package(tmp_path / "t5", tiny_t5(), t5_base, target_modules=("q", "v"))

    result = validate_directory(package, t5_base)

    assert result.adapter_config["task_type"] == "SEQ_2_SEQ_LM"
    assert "encoder.block.0.layer.0.SelfAttention.q" in result.module_paths
    assert "decoder.block.1.layer.1.EncDecAttention.v" in result.module_paths


def test_an_accepted_package_loads_in_peft_as_it_is(package: Path, base: BaseModelSpec) -> None:
    validate_directory(package, base)
    model = PeftModel.from_pretrained(tiny_llama(), package)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    expected = load_torch_file(str(package / ADAPTER_WEIGHTS_FILE))[Q0_B]
    assert torch.equal(lora_b, expected)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(contents=st.binary(max_size=256), header_length=st.integers(0, 300))
def test_arbitrary_bytes_are_refused_cleanly(
    package: Path, base: BaseModelSpec, contents: bytes, header_length: int
) -> None:
    # Whatever the bytes, the answer is a PackageRejected, never a crash.
    path = package / ROUTER_FILE
    path.write_bytes(header_length.to_bytes(8, "little") + contents)
    with pytest.raises(PackageRejected) as info:
        validate_directory(package, base)
    assert info.value.file == ROUTER_FILE
