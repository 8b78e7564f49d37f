"""The routing methods' specs: one per method, and what each asks of a release."""

import pytest

from protocol import (
    AVERAGE_ACTIVATION,
    GATE,
    METHOD_SPECS,
    METHODS,
    RETRIEVAL_EMBEDDINGS,
    TOKEN_METHODS,
    ExpertManifest,
    method_spec,
)


def test_every_method_has_its_spec_under_its_name():
    assert METHODS == (
        "phatgoose", "arrow", "average_activation", "retrieval", "merged", "single", "base"
    )  # fmt: skip
    assert {name: spec.name for name, spec in METHOD_SPECS.items()} == {m: m for m in METHODS}


def test_token_methods_are_the_per_token_routers():
    assert TOKEN_METHODS == ("phatgoose", "arrow", "average_activation")


def test_each_method_names_the_vectors_each_expert_must_ship():
    needs = {name: [v.name for v in spec.needs] for name, spec in METHOD_SPECS.items()}
    assert needs == {
        "phatgoose": ["gate"],
        "arrow": [],
        "average_activation": ["average_activation"],
        "retrieval": ["retrieval"],
        "merged": [],
        "single": [],
        "base": [],
    }


def test_only_single_names_one_expert_only_base_takes_none_only_merged_needs_same_shapes():
    specs = METHOD_SPECS.values()
    assert [s.name for s in specs if s.single_expert] == ["single"]
    assert [s.name for s in specs if not s.takes_experts] == ["base"]
    assert [s.name for s in specs if s.same_shapes] == ["merged"]


def test_optional_vectors_are_flagged_by_expert_manifest_fields():
    for vector in (AVERAGE_ACTIVATION, RETRIEVAL_EMBEDDINGS):
        assert ExpertManifest.model_fields[vector.manifest_flag].annotation is bool


def test_a_vector_is_shipped_when_the_manifest_flags_it_and_gates_always_are():
    assert AVERAGE_ACTIVATION.shipped_in({"has_average_activation": True})
    assert not AVERAGE_ACTIVATION.shipped_in({"has_average_activation": False})
    assert not RETRIEVAL_EMBEDDINGS.shipped_in({})
    assert GATE.shipped_in({})


def test_an_unknown_method_is_refused_with_the_list_of_methods():
    assert method_spec("arrow").per_token
    with pytest.raises(ValueError, match=r"unknown routing method 'moe'; expected one of .*'base'"):
        method_spec("moe")
