"""The ClientApp reads its train request through the one typed definition (protocol.flower)."""

import pytest

from client.flower_app import NodeConfigError, contributor_settings, node_dataset
from client.flower_app import app as client_app
from client.training import ContributorOptions
from protocol.flower import FlowerConfigError, TrainingRequest
from tests.e2e.flower_helpers import node_context, train_message


def test_a_request_becomes_the_contributors_training_settings():
    request = TrainingRequest(
        lora_rank=2,
        lora_alpha=4.0,
        lora_steps=3,
        gate_steps=2,
        batch_size=4,
        max_length=48,
        learning_rate=0.01,
        gate_learning_rate=0.02,
        max_examples=16,
        average_activation=False,
        seed=5,
    )

    training, options = contributor_settings(request)

    assert (training.r, training.lora_alpha, training.steps, training.gate_steps) == (2, 4.0, 3, 2)
    assert (training.batch_size, training.max_length, training.seed) == (4, 48, 5)
    assert (training.learning_rate, training.gate_learning_rate) == (0.01, 0.02)
    assert options == ContributorOptions(max_examples=16, average_activation=False, progress=False)


def test_zero_means_the_lora_learning_rate_and_every_example():
    training, options = contributor_settings(
        TrainingRequest(gate_learning_rate=0.0, max_examples=0)
    )

    assert training.gate_learning_rate is None
    assert options.max_examples is None


def test_no_budget_asked_means_no_dp_and_the_requested_activations():
    training, options = contributor_settings(TrainingRequest(average_activation=True))

    assert training.dp is None and options.average_activation


def test_the_run_configs_budget_becomes_dp_without_average_activations():
    request = TrainingRequest(dp_epsilon=8.0, dp_delta=1e-6, dp_max_grad_norm=0.5)

    training, options = contributor_settings(request, {})

    assert training.dp is not None
    assert (training.dp.epsilon, training.dp.delta, training.dp.max_grad_norm) == (8.0, 1e-6, 0.5)
    assert not options.average_activation


@pytest.mark.parametrize(
    ("run", "node", "expected"), [(8.0, "1", 1.0), (1.0, 8, 1.0), (0.0, 4, 4.0)]
)
def test_the_stricter_of_the_run_and_node_budgets_applies(run, node, expected):
    training, _ = contributor_settings(TrainingRequest(dp_epsilon=run), {"dp-epsilon": node})

    assert training.dp is not None and training.dp.epsilon == expected


@pytest.mark.parametrize("node", ["lots", "-1", "nan"])
def test_a_bad_node_budget_is_refused_naming_it(node):
    with pytest.raises(NodeConfigError, match="dp-epsilon"):
        contributor_settings(TrainingRequest(), {"dp-epsilon": node})


def test_a_bad_train_request_fails_naming_the_key_before_any_training():
    message = train_message({"lora-rank": "eight"}, 3)
    context = node_context(3, {"data-path": "/nowhere/data.jsonl"}, {})

    with pytest.raises(FlowerConfigError, match="train request: 'lora-rank' = 'eight'"):
        client_app(message, context)


def test_a_simulated_node_finds_its_dataset_in_the_run_config():
    context = node_context(
        9, {"partition-id": 1}, {"simulation-datasets": "ant=/a.jsonl; bee=/b.jsonl"}
    )

    assert node_dataset(context) == ("/b.jsonl", "bee")
