"""Admission of manifests and adapter configs against hostile input (issue 14): numbers
that overflow, unbounded strings and lists, a manifest that misstates what the adapter
adapts, and adapter-config keys that PEFT acts on when loading."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from protocol import ADAPTER_CONFIG_FILE, MANIFEST_FILE, BaseModelSpec, peft_format
from protocol.limits import AdmissionLimits
from protocol.manifest import MAX_IDENTIFIER_CHARS, MAX_TARGET_MODULES
from protocol.peft_format import matches_target_modules, target_module_matcher
from protocol.validation import (
    PackageRejected,
    adapted_modules,
    canonical_json_bytes,
    file_sha256,
    package_digest,
    validate_directory,
)
from tests.protocol.packages import base_spec, edit_json, write_package
from tests.tiny import tiny_llama


@pytest.fixture(scope="module")
def base() -> BaseModelSpec:
    return base_spec(tiny_llama())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, base: BaseModelSpec) -> Path:
    return write_package(tmp_path_factory.mktemp("pristine") / "expert", tiny_llama(), base)


@pytest.fixture
def package(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "expert"))


def rejection(
    package: Path, base: BaseModelSpec, limits: AdmissionLimits | None = None
) -> PackageRejected:
    with pytest.raises(PackageRejected) as info:
        validate_directory(package, base, limits or AdmissionLimits())
    return info.value


def replace_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def set_manifest(package: Path, *keys: str, value: Any) -> None:
    def edit(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    edit_json(package / MANIFEST_FILE, edit)


# --- item 4: numbers JSON cannot carry back ------------------------------------------------


@pytest.mark.parametrize("literal", ["1e999", "-1e999", "1E400"])
def test_an_overflowing_number_in_the_manifest_is_rejected(
    package: Path, base: BaseModelSpec, literal: str
) -> None:
    set_manifest(package, "training", "learning_rate", value=0.5)
    replace_text(package / MANIFEST_FILE, '"learning_rate": 0.5', f'"learning_rate": {literal}')
    error = rejection(package, base)
    assert (error.check, error.file) == ("not_json", MANIFEST_FILE)
    assert "overflows" in error.message


def test_an_overflowing_number_in_the_adapter_config_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    edit_json(package / ADAPTER_CONFIG_FILE, lambda c: c.update(lora_dropout=0.25))
    replace_text(package / ADAPTER_CONFIG_FILE, '"lora_dropout": 0.25', '"lora_dropout": 1e999')
    error = rejection(package, base)
    assert (error.check, error.file) == ("not_json", ADAPTER_CONFIG_FILE)


@pytest.mark.parametrize("value", [2**53, -(2**53), 10**30])
def test_an_integer_beyond_two_to_the_53_is_rejected(
    package: Path, base: BaseModelSpec, value: int
) -> None:
    set_manifest(package, "training", "examples", value=value)
    error = rejection(package, base)
    assert (error.check, error.file) == ("not_json", MANIFEST_FILE)
    assert "2^53" in error.message


def test_the_largest_safe_integer_is_a_valid_count(package: Path, base: BaseModelSpec) -> None:
    set_manifest(package, "training", "examples", value=2**53 - 1)
    validate_directory(package, base)


# --- item 8: the manifest says what the adapter adapts --------------------------------------


def test_manifest_target_modules_must_match_the_adapter_config(
    package: Path, base: BaseModelSpec
) -> None:
    # Same rank, alpha and module count: only the names differ (q_proj for k_proj).
    set_manifest(package, "lora", "target_modules", value=["down_proj", "k_proj", "v_proj"])
    error = rejection(package, base)
    assert (error.check, error.file) == ("manifest_mismatch", MANIFEST_FILE)
    assert "k_proj" in error.message and "q_proj" in error.message
    assert error.expected == 'lora.target_modules ["down_proj", "q_proj", "v_proj"]'


def test_manifest_target_modules_may_be_in_any_order(package: Path, base: BaseModelSpec) -> None:
    set_manifest(package, "lora", "target_modules", value=["v_proj", "down_proj", "q_proj"])
    validate_directory(package, base)


# --- item 9: bounded strings and lists -----------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        ("license",),
        ("library_version",),
        ("base_model", "revision"),
        ("base_model", "name"),
    ],
)
def test_an_overlong_manifest_string_is_rejected_naming_the_field(
    package: Path, base: BaseModelSpec, keys: tuple[str, ...]
) -> None:
    set_manifest(package, *keys, value="x" * (MAX_IDENTIFIER_CHARS + 1))
    error = rejection(package, base)
    assert (error.check, error.file) == ("manifest_schema", MANIFEST_FILE)
    assert f"field '{'.'.join(keys)}'" in error.message
    assert str(MAX_IDENTIFIER_CHARS) in (error.expected or "")


def test_a_one_megabyte_licence_is_rejected(package: Path, base: BaseModelSpec) -> None:
    set_manifest(package, "license", value="MIT " * 200_000)
    error = rejection(package, base)
    # The file limit (1 MiB) or the field limit: either way not admitted.
    assert error.check in ("manifest_schema", "too_large")


def test_an_overlong_target_module_name_in_the_manifest_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    set_manifest(package, "lora", "target_modules", value=["q_proj" * 100])
    error = rejection(package, base)
    assert (error.check, error.file) == ("manifest_schema", MANIFEST_FILE)
    assert "field 'lora.target_modules.0'" in error.message


def test_a_control_character_in_a_manifest_identifier_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    set_manifest(package, "license", value="MIT\n<script>")
    error = rejection(package, base)
    assert (error.check, error.file) == ("manifest_schema", MANIFEST_FILE)
    assert "field 'license'" in error.message


def test_too_many_target_modules_in_the_manifest_is_rejected(
    package: Path, base: BaseModelSpec
) -> None:
    set_manifest(package, "lora", "target_modules", value=[f"m{i}" for i in range(1025)])
    error = rejection(package, base)
    assert (error.check, error.file) == ("manifest_schema", MANIFEST_FILE)
    assert "field 'lora.target_modules'" in error.message
    assert str(MAX_TARGET_MODULES) in (error.expected or "")


# --- item 14: target_modules lists are bounded and matched in linear time --------------------


def test_a_100000_name_target_modules_list_is_refused_before_matching(
    package: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["q_proj", "v_proj", "down_proj"] + [f"nothing_{i}" for i in range(100_000)]
    edit_json(package / ADAPTER_CONFIG_FILE, lambda c: c.update(target_modules=names))
    calls: list[int] = []
    monkeypatch.setattr(
        "protocol.validation.target_module_matcher",
        lambda names: calls.append(1) or target_module_matcher(names),
    )
    # A limit on JSON files large enough that only the list's length can refuse it.
    error = rejection(package, base, AdmissionLimits(max_json_bytes=16 * 2**20))
    assert (error.check, error.file) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "100003 names" in error.message
    assert str(MAX_TARGET_MODULES) in (error.expected or "")
    assert calls == []  # refused on its length, before any module was matched


def test_an_overlong_name_in_target_modules_is_refused(package: Path, base: BaseModelSpec) -> None:
    edit_json(
        package / ADAPTER_CONFIG_FILE,
        lambda c: c.update(target_modules=["q_proj", "x" * (MAX_IDENTIFIER_CHARS + 1)]),
    )
    error = rejection(package, base)
    assert (error.check, error.file) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "target_modules[1]" in error.message
    assert len(error.message) < 1000  # the 257 characters are not echoed in full


def test_exclude_modules_has_the_same_bounds(package: Path, base: BaseModelSpec) -> None:
    edit_json(
        package / ADAPTER_CONFIG_FILE,
        lambda c: c.update(exclude_modules=[f"m{i}" for i in range(MAX_TARGET_MODULES + 1)]),
    )
    error = rejection(package, base)
    assert (error.check, error.file) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "exclude_modules lists" in error.message


def test_a_regular_expression_target_modules_is_refused_without_being_run(
    package: Path, base: BaseModelSpec
) -> None:
    # Catastrophic backtracking if anything ran it against the module paths.
    edit_json(package / ADAPTER_CONFIG_FILE, lambda c: c.update(target_modules="(a+)+$" * 1000))
    error = rejection(package, base)
    assert (error.check, error.file) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "regular expression" in error.message
    assert len(error.message) < 1000


def test_a_1000_name_list_is_matched_with_one_lookup_per_path_suffix(
    base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["q_proj", "v_proj"] + [f"nothing_{i}" for i in range(998)]
    lookups = 0

    class CountingSet(frozenset[str]):
        def __contains__(self, item: object) -> bool:
            nonlocal lookups
            lookups += 1
            return super().__contains__(item)

    monkeypatch.setattr(peft_format, "frozenset", CountingSet, raising=False)
    selected = adapted_modules(names, base)
    assert [m.path.rsplit(".", 1)[-1] for m in selected] == ["q_proj", "v_proj"] * 2
    # At most one lookup per dot-suffix of each path (plus the empty exclude list's),
    # where pairwise matching would make paths x names comparisons.
    suffixes = sum(m.path.count(".") + 1 for m in base.linear_modules)
    assert 0 < lookups <= 2 * suffixes
    assert lookups < len(base.linear_modules) * len(names) / 100


@pytest.mark.parametrize(
    ("path", "names", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["model.layers.0.self_attn.q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["proj"], False),
        ("model.layers.0.self_attn.q_proj", ["attn.q_proj"], False),
        ("model.layers.0.self_attn.q_proj", ["layers.0"], False),
        ("q_proj", ["q_proj"], True),
        ("a..q_proj", [".q_proj"], True),
    ],
)
def test_set_matching_follows_peft_suffix_rule(path: str, names: list[str], expected: bool) -> None:
    naive = any(path == n or path.endswith("." + n) for n in names)
    assert naive == expected
    assert matches_target_modules(path, names) == expected
    assert target_module_matcher(names)(path) == expected


# --- item 16: the adapter config is stored canonically ---------------------------------------


def test_auto_mapping_and_other_load_time_keys_are_not_stored(
    package: Path, base: BaseModelSpec
) -> None:
    edit_json(
        package / ADAPTER_CONFIG_FILE,
        lambda c: c.update(
            auto_mapping={"base_model_class": "os.system", "parent_library": "os"},
            megatron_core="os",
            base_model_name_or_path="https://example.invalid/evil",
            revision="main",
            peft_version="0.0.0+evil",
            loftq_config={"loftq_bits": 4},
            lora_dropout=0.1,
        ),
    )
    result = validate_directory(package, base)
    stored = json.loads(result.canonical_adapter_config)
    for key in ("auto_mapping", "megatron_core", "revision", "peft_version", "loftq_config"):
        assert key not in stored
    assert stored["base_model_name_or_path"] == base.name
    assert result.adapter_config == stored
    assert result.file_sha256[ADAPTER_CONFIG_FILE] == (
        hashlib.sha256(result.canonical_adapter_config).hexdigest()
    )
    assert result.file_bytes[ADAPTER_CONFIG_FILE] == len(result.canonical_adapter_config)
    assert result.digest == package_digest(result.file_sha256)


def test_the_canonical_config_holds_only_the_allow_list(package: Path, base: BaseModelSpec) -> None:
    stored = validate_directory(package, base).adapter_config
    assert stored == {
        "alpha_pattern": {},
        "base_model_name_or_path": base.name,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": 8,
        "lora_bias": False,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "target_modules": ["down_proj", "q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def test_canonical_rewrite_is_a_fixed_point(package: Path, base: BaseModelSpec) -> None:
    first = validate_directory(package, base)
    (package / ADAPTER_CONFIG_FILE).write_bytes(first.canonical_adapter_config)
    second = validate_directory(package, base)
    assert second.canonical_adapter_config == first.canonical_adapter_config
    assert second.digest == first.digest
    assert file_sha256(package / ADAPTER_CONFIG_FILE) == first.file_sha256[ADAPTER_CONFIG_FILE]
    assert canonical_json_bytes(second.adapter_config) == second.canonical_adapter_config


def test_uploads_differing_only_in_dropped_keys_have_one_digest(
    package: Path, base: BaseModelSpec
) -> None:
    plain = validate_directory(package, base).digest
    edit_json(package / ADAPTER_CONFIG_FILE, lambda c: c.update(peft_version="9.9.9"))
    assert validate_directory(package, base).digest == plain


def test_the_canonical_config_loads_in_peft(package: Path, base: BaseModelSpec) -> None:
    from peft import LoraConfig

    result = validate_directory(package, base)
    (package / ADAPTER_CONFIG_FILE).write_bytes(result.canonical_adapter_config)
    config = LoraConfig.from_pretrained(str(package))
    assert config.auto_mapping is None
    assert set(config.target_modules) == {"down_proj", "q_proj", "v_proj"}
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (4, 8, base.name)


def test_semantic_keys_are_still_refused(package: Path, base: BaseModelSpec) -> None:
    edit_json(package / ADAPTER_CONFIG_FILE, lambda c: c.update(megatron_config={"x": 1}))
    error = rejection(package, base)
    assert (error.check, error.file) == ("peft_config", ADAPTER_CONFIG_FILE)
    assert "megatron_config" in error.message
