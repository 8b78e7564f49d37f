"""DP-SGD training of an expert (phatgoose/training/privacy.py): per-example gradients,
clipping and noise as planned, Poisson sampling, the guarantee of LoRA and gates together,
and the refusals."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from phatgoose import pipeline
from phatgoose.data import Example
from phatgoose.expert import ExpertError
from phatgoose.training import (
    DifferentialPrivacy,
    TrainingConfig,
    split_validation,
    train_expert,
    train_gates,
)
from phatgoose.training.privacy import (
    PrivatePlan,
    dp_optimizer,
    plan_privacy,
    poisson_batches,
    set_per_example_gradients,
)
from protocol import validate_directory
from protocol.privacy import accounted_epsilon
from tests.protocol.packages import base_spec
from tests.tiny import tiny_llama, tiny_t5, tiny_tokenizer

MAKERS = {"llama": tiny_llama, "t5": tiny_t5}
TASK = [
    Example(prompt=f"{c}{d} ->", target=f"{c}{c}".upper()) for c in "abcdefgh" for d in "abcdefgh"
]
DP = DifferentialPrivacy(epsilon=8.0, noise_seed=0)
CONFIG = TrainingConfig(
    r=4, lora_alpha=8, steps=12, batch_size=8, learning_rate=2e-2, max_length=32, gate_steps=4
)


def plan(noise: float, clip: float, expected_batch: float) -> PrivatePlan:
    return PrivatePlan(
        noise_multiplier=noise,
        sample_rate=0.5,
        delta=1e-5,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        accountant="rdp",
        noise_seed=0,
    )


def test_per_example_gradients_are_each_examples_own() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    params = [layer.weight, layer.bias]
    inputs = {f"x{i}": torch.randn(3) for i in range(4)}

    def loss_of(example: Example) -> torch.Tensor:
        return layer(inputs[example.prompt]).pow(2).sum()

    batch = [Example(prompt=f"x{i}", target="") for i in range(4)]
    mean = set_per_example_gradients(params, batch, loss_of)
    for i, example in enumerate(batch):
        grads = torch.autograd.grad(loss_of(example), params)
        for param, grad in zip(params, grads, strict=True):
            torch.testing.assert_close(param.grad_sample[i], grad)
    assert mean == pytest.approx(sum(float(loss_of(e)) for e in batch) / 4)
    set_per_example_gradients(params, [], loss_of)
    assert layer.weight.grad_sample.shape == (0, 2, 3)


def test_the_optimiser_clips_each_example_and_averages_over_the_expected_batch() -> None:
    """Without noise, AdamW's first step moves each coordinate by lr * sign(gradient): the
    gradient it sees must be the sum of the clipped examples over the expected batch."""
    weight = nn.Parameter(torch.zeros(2))
    clip, expected_batch = 1.0, 4.0
    optimizer = dp_optimizer(
        [weight], plan(0.0, clip, expected_batch), learning_rate=1.0, weight_decay=0.0
    )
    per_example = torch.tensor([[3.0, 4.0], [0.3, -0.4]])  # norms 5 (clipped to 1) and 0.5
    weight.grad_sample = per_example.clone()
    optimizer.step()
    clipped = per_example[0] / 5 + per_example[1]
    torch.testing.assert_close(weight.grad, clipped / expected_batch)


def test_the_noise_has_the_planned_scale_even_on_an_empty_batch() -> None:
    weight = nn.Parameter(torch.zeros(200_000))
    noise, clip, expected_batch = 1.5, 0.5, 8.0
    optimizer = dp_optimizer(
        [weight], plan(noise, clip, expected_batch), learning_rate=1.0, weight_decay=0.0
    )
    weight.grad_sample = torch.zeros((0, weight.numel()))
    optimizer.step()
    std = float(weight.grad.std())
    assert std == pytest.approx(noise * clip / expected_batch, rel=0.02)


def test_poisson_batches_include_each_example_independently_at_the_rate() -> None:
    examples = [Example(prompt=str(i), target="") for i in range(50)]
    stream = poisson_batches(examples, 0.1, torch.Generator().manual_seed(0))
    sizes, counts = [], dict.fromkeys(range(50), 0)
    for _ in range(4000):
        batch = next(stream)
        sizes.append(len(batch))
        for example in batch:
            counts[int(example.prompt)] += 1
    mean = sum(sizes) / len(sizes)
    variance = sum((s - mean) ** 2 for s in sizes) / len(sizes)
    assert mean == pytest.approx(5.0, rel=0.03)  # n q
    assert variance == pytest.approx(4.5, rel=0.1)  # n q (1 - q): sizes vary, as they must
    assert 0 in sizes
    assert all(abs(c / 4000 - 0.1) < 0.02 for c in counts.values())


def test_the_plan_spends_the_budget_over_the_lora_and_gate_steps_together() -> None:
    config = dataclasses.replace(CONFIG, dp=DP)
    planned = config.private_plan(64)
    assert planned.sample_rate == 8 / 64 and planned.expected_batch_size == 8
    spent = accounted_epsilon(
        noise_multiplier=planned.noise_multiplier,
        sample_rate=planned.sample_rate,
        steps=CONFIG.steps + 4,
        delta=1e-5,
        accountant="rdp",
    )
    assert 7.9 <= spent <= 8.0
    tighter = dataclasses.replace(config, dp=dataclasses.replace(DP, epsilon=1.0))
    assert tighter.private_plan(64).noise_multiplier > planned.noise_multiplier


@pytest.mark.parametrize(
    ("field", "value"),
    [("epsilon", 0.0), ("epsilon", math.inf), ("delta", 1.0), ("max_grad_norm", 0.0)],
)
def test_invalid_privacy_settings_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"DifferentialPrivacy.{field}"):
        DifferentialPrivacy(**{"epsilon": 1.0, field: value})


def test_a_delta_not_below_one_over_n_is_refused() -> None:
    with pytest.raises(ValueError, match="not below 1/n"):
        plan_privacy(
            DifferentialPrivacy(epsilon=1, delta=0.01), examples=200, batch_size=8, total_steps=10
        )


@pytest.fixture(scope="module", params=sorted(MAKERS))
def private_expert(request):
    torch.set_num_threads(1)
    model = MAKERS[request.param]()
    tokenizer = tiny_tokenizer()
    config = dataclasses.replace(CONFIG, dp=DP)
    lora = train_expert(model, tokenizer, TASK, name="dp", config=config, progress=False)
    expert = train_gates(model, tokenizer, lora, TASK, config=config, progress=False)
    return model, lora, expert


def test_a_private_expert_states_the_guarantee_of_lora_and_gates(private_expert) -> None:
    _, lora, expert = private_expert
    training, validation = split_validation(TASK, dataclasses.replace(CONFIG, dp=DP))
    assert validation == [] and len(training) == len(TASK)  # no checkpoint picked on data
    assert lora.manifest.privacy is not None and lora.manifest.privacy.steps == CONFIG.steps
    guarantee = expert.manifest.privacy
    assert guarantee is not None
    assert guarantee.steps == CONFIG.steps + 4
    assert guarantee.sample_rate == 8 / 64 and guarantee.delta == 1e-5
    assert lora.manifest.privacy.epsilon < guarantee.epsilon <= 8.0
    assert guarantee.library.startswith("opacus ")
    # No loss computed on private examples is published.
    assert expert.manifest.training.final_loss is None
    assert expert.manifest.training.final_gate_loss is None
    # The update is real: B left zero and the gates left zero.
    assert any(float(t.abs().max()) > 0 for k, t in expert.lora_weights.items() if "lora_B" in k)
    assert any(float(g.abs().max()) > 0 for g in expert.gates.values())


def test_a_private_expert_passes_admission(private_expert, tmp_path) -> None:
    model, _, expert = private_expert
    spec = base_spec(model, name=expert.manifest.base_model.name)
    spec = spec.model_copy(update={"fingerprint": expert.manifest.base_model.fingerprint})
    result = validate_directory(expert.save(tmp_path / "dp"), spec)
    assert result.manifest.privacy == expert.manifest.privacy


def test_gates_trained_without_dp_drop_the_guarantee(private_expert) -> None:
    model, lora, _ = private_expert
    with pytest.warns(UserWarning, match="without DP"):
        expert = train_gates(model, tiny_tokenizer(), lora, TASK, config=CONFIG, progress=False)
    assert expert.manifest.privacy is None


def test_dp_gates_over_a_lora_trained_without_dp_give_no_guarantee(llama, tokenizer) -> None:
    lora = train_expert(
        llama,
        tokenizer,
        TASK,
        name="plain",
        config=dataclasses.replace(CONFIG, steps=2),
        progress=False,
    )
    config = dataclasses.replace(CONFIG, steps=2, dp=DP)
    with pytest.warns(UserWarning, match="not trained under this DP plan"):
        expert = train_gates(llama, tokenizer, lora, TASK, config=config, progress=False)
    assert expert.manifest.privacy is None


def test_resuming_under_dp_is_refused(private_expert) -> None:
    model, lora, _ = private_expert
    config = dataclasses.replace(CONFIG, dp=DP)
    with pytest.raises(ExpertError, match="cannot resume training under differential privacy"):
        train_expert(
            model,
            tiny_tokenizer(),
            TASK,
            name="dp2",
            config=config,
            resume_from=lora,
            progress=False,
        )


@pytest.mark.parametrize("vector", ["average_activation", "retrieval"])
def test_unprivatised_vectors_are_refused_before_training(llama, tokenizer, vector) -> None:
    flags = {"average_activation": False, "retrieval": False, vector: True}
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be shipped with a differentially private"):
        pipeline.train_contributor_expert(
            llama,
            tokenizer,
            TASK,
            name="dp",
            config=dataclasses.replace(CONFIG, dp=DP),
            progress=False,
            **flags,
        )
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in before.items())


def test_dp_training_runs_in_bfloat16_compute_with_float32_updates(llama, tokenizer) -> None:
    config = dataclasses.replace(CONFIG, steps=2, gate_steps=2, dp=DP, precision="bfloat16")
    lora = train_expert(llama, tokenizer, TASK, name="bf16", config=config, progress=False)
    expert = train_gates(llama, tokenizer, lora, TASK, config=config, progress=False)

    assert expert.manifest.privacy is not None and expert.manifest.privacy.steps == 4
    assert expert.manifest.training.precision == "bfloat16"
    assert all(t.dtype == torch.float32 for t in expert.lora_weights.values())
