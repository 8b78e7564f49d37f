"""The Flower run config and train request: one typed definition, Flower's spelling on the
wire, and errors that name the bad key."""

import tomllib
from pathlib import Path

import pytest

from phatgoose.models import DEFAULT_BASE_MODEL
from protocol.flower import (
    FlowerConfigError,
    RoundSettings,
    TrainingRequest,
    run_config_defaults,
    split_run_config,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyprojects_run_config_is_exactly_the_typed_defaults():
    # Flower reads the defaults (and the keys it lets `--run-config` override) from there.
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert table == run_config_defaults()
    assert list(table) == list(run_config_defaults())


def test_the_default_base_model_is_the_librarys():
    assert TrainingRequest().base_model == DEFAULT_BASE_MODEL


def test_a_request_travels_with_flowers_spelling_and_comes_back_equal():
    request = TrainingRequest(lora_rank=2, lora_alpha=4.0, max_examples=16, seed=3)

    config = request.to_config()

    assert config["lora-rank"] == 2
    assert config["max-examples"] == 16
    assert all("_" not in key for key in config)
    assert TrainingRequest.from_config(config) == request


def test_a_missing_key_takes_its_default_and_an_int_is_a_float():
    request = TrainingRequest.from_config({"lora-steps": 5, "lora-alpha": 4})

    assert request == TrainingRequest(lora_steps=5, lora_alpha=4.0)
    assert isinstance(request.lora_alpha, float)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"lora-rank": "8"}, "train request: 'lora-rank' = '8': Input should be a valid integer"),
        ({"lora-rank": True}, "'lora-rank' = True: Input should be a valid integer"),
        ({"lora-steps": 0}, "'lora-steps' = 0: Input should be greater than or equal to 1"),
        ({"average-activation": 1}, "'average-activation' = 1: Input should be a valid boolean"),
        ({"lora-step": 40}, "train request: unknown key 'lora-step' (known: base-model, "),
        ({"lora_rank": 2}, "unknown key 'lora_rank'"),
    ],
)
def test_a_bad_request_names_the_key_and_the_value(config, message):
    with pytest.raises(FlowerConfigError) as error:
        TrainingRequest.from_config(config)
    assert message in str(error.value)


def test_changes_are_validated_again():
    assert TrainingRequest().with_changes(lora_steps=6).lora_steps == 6
    with pytest.raises(FlowerConfigError, match="'lora_steps' = -1: Input should be greater"):
        TrainingRequest().with_changes(lora_steps=-1)


def test_the_run_config_splits_into_the_request_and_the_rounds_settings():
    request, round_settings = split_run_config(
        {**run_config_defaults(), "lora-steps": 3, "min-nodes": 2, "namespace": "lab"}
    )

    assert request == TrainingRequest(lora_steps=3)
    assert round_settings == RoundSettings(min_nodes=2, namespace="lab")
    # The round's settings never travel to the nodes.
    assert not set(request.to_config()) & set(round_settings.to_config())


def test_a_run_config_key_of_neither_part_is_named():
    with pytest.raises(FlowerConfigError, match=r"run config: unknown key\(s\) 'min-node'"):
        split_run_config({"min-node": 2})
