"""The routing methods' specs: one per method, and what each asks of a release."""

import re

import pytest

from protocol import (
    AVERAGE_ACTIVATION,
    GATE,
    METHOD_SPECS,
    METHODS,
    PROMPT_METHODS,
    RETRIEVAL_EMBEDDINGS,
    TOKEN_METHODS,
    TOP_K_METHODS,
    ExpertManifest,
    method_spec,
    resolve_params,
)


def test_every_method_has_its_spec_under_its_name():
    assert METHODS == (
        "phatgoose", "phatgoose_example", "smear", "arrow", "spectr", "average_activation",
        "retrieval", "merged", "ties", "dare", "single", "base",
    )  # fmt: skip
    assert {name: spec.name for name, spec in METHOD_SPECS.items()} == {m: m for m in METHODS}


def test_token_methods_are_the_per_token_routers():
    assert TOKEN_METHODS == ("phatgoose", "arrow", "spectr", "average_activation")


def test_prompt_methods_decide_per_example_and_top_k_is_for_those_that_select():
    assert PROMPT_METHODS == ("phatgoose_example", "smear")
    assert TOP_K_METHODS == (
        "phatgoose", "phatgoose_example", "arrow", "spectr", "average_activation",
    )  # fmt: skip
    assert not set(PROMPT_METHODS) & set(TOKEN_METHODS)


def test_each_method_names_the_vectors_each_expert_must_ship():
    needs = {name: [v.name for v in spec.needs] for name, spec in METHOD_SPECS.items()}
    assert needs == {
        "phatgoose": ["gate"],
        "phatgoose_example": ["gate"],
        "smear": ["gate"],
        "arrow": [],
        "spectr": [],
        "average_activation": ["average_activation"],
        "retrieval": ["retrieval"],
        "merged": [],
        "ties": [],
        "dare": [],
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


def test_parameters_are_resolved_to_every_default_and_checked():
    assert resolve_params("phatgoose") == {}
    assert resolve_params("ties") == {"density": 0.2, "scale": 1.0}
    assert resolve_params("dare", {"seed": 7.0, "merge": "ties"}) == {
        "drop_rate": 0.9, "merge": "ties", "scale": 1.0, "seed": 7,
    }  # fmt: skip
    assert isinstance(resolve_params("dare", {"seed": 7.0})["seed"], int)
    assert resolve_params("spectr", {"weighting": "softmax"}) == {
        "score": "input", "weighting": "softmax",
    }  # fmt: skip
    # Resolving is idempotent: a release's stored params resolve to themselves.
    for method in METHODS:
        resolved = resolve_params(method)
        assert resolve_params(method, resolved) == resolved


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("ties", {"density": 0}, "parameter 'density' must be a number > 0 and <= 1, got 0"),
        ("ties", {"density": 1.5}, "'density' must be a number > 0 and <= 1"),
        ("ties", {"density": True}, "'density' must be a number"),
        ("ties", {"density": "0.2"}, "'density' must be a number"),
        ("ties", {"scale": float("nan")}, "'scale' must be a number > 0, got nan"),
        ("dare", {"drop_rate": 1}, "'drop_rate' must be a number >= 0 and < 1, got 1"),
        ("dare", {"seed": 1.5}, "'seed' must be an integer >= 0"),
        ("dare", {"seed": -1}, "'seed' must be an integer >= 0"),
        ("dare", {"merge": "sum"}, "'merge' must be one of 'average', 'ties', got 'sum'"),
        ("spectr", {"score": 1}, "'score' must be one of 'input', 'spectrum'"),
        (
            "ties",
            {"drop_rate": 0.5},
            "method 'ties' has no parameter(s) 'drop_rate'; its parameters: density, scale",
        ),
        ("phatgoose", {"k": 2}, "method 'phatgoose' has no parameter(s) 'k'; its parameters: none"),
    ],
)
def test_a_bad_parameter_is_refused_naming_method_parameter_and_what_it_takes(
    method, given, message
):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_params(method, given)


def test_a_parameter_is_found_by_name_and_an_unknown_one_is_named():
    assert method_spec("spectr").param("score").choices == ("input", "spectrum")
    with pytest.raises(KeyError, match="method 'ties' has no parameter 'seed'"):
        method_spec("ties").param("seed")
