"""Computing in bfloat16 on tiny models: which tensors are bfloat16 while it runs, what stays
float32, that everything is restored bit for bit, and how far results move from float32.

The suite pins `auto` to float32 (tests/conftest.py); these tests ask for bfloat16.
"""

import dataclasses

import pytest
import torch
from torch import nn

from phatgoose.data import Example
from phatgoose.evaluation import evaluate_task, score_choices
from phatgoose.precision import PRECISION_ENV, compute_in, resolve_precision
from phatgoose.routing import build_routed_model, unroute_model
from phatgoose.routing.layer import RoutedLinear
from phatgoose.training import mean_target_loss, train_expert, train_gates
from tests.phatgoose.experts import random_expert
from tests.phatgoose.test_training import CONFIG as TRAINING_CONFIG
from tests.phatgoose.test_training import TASK
from tests.tiny import tiny_llama, tiny_t5

BF16 = resolve_precision("bfloat16")
FP32 = resolve_precision("float32")

EXAMPLES = [
    Example(prompt="2 + 2 =", choices=[" 4", " 5", " twenty two"], answer=0),
    Example(prompt="The sky is", choices=[" blue", " green"], answer=0),
    Example(prompt="Q: capital of France?\nA:", choices=[" Paris", " Rome", " Oslo"], answer=0),
]
# test_training's learnable task, with fewer steps: both precisions train here.
CONFIG = dataclasses.replace(TRAINING_CONFIG, steps=16, gate_steps=4)


def storage_of(model: nn.Module) -> dict[str, int]:
    """Where each parameter's values live: the same address means the very same tensor."""
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def test_auto_follows_the_pinning_variable(monkeypatch):
    assert resolve_precision("auto").name == "float32"  # the suite's pin
    monkeypatch.setenv(PRECISION_ENV, "bfloat16")
    assert resolve_precision("auto").name == "bfloat16"
    assert resolve_precision("float32").name == "float32"  # explicit still wins
    monkeypatch.setenv(PRECISION_ENV, "fp8")
    with pytest.raises(ValueError, match="PHATGOOSE_PRECISION='fp8' is not float32 or bfloat16"):
        resolve_precision("auto")


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_inference_copies_frozen_matrices_to_bf16_and_restores_the_originals(make):
    model = make()
    before = storage_of(model)
    copies = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen: dict[str, torch.dtype] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, m.weight.dtype)
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    ids = torch.tensor([[5, 6, 7, 8]])
    extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    with torch.no_grad(), compute_in(BF16, model):
        logits = model(input_ids=ids, **extra).logits
    for hook in hooks:
        hook.remove()
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head)
    assert seen.pop(head_name) == torch.float32  # tied to the embedding: never cast
    assert set(seen.values()) == {torch.bfloat16}
    assert logits.dtype == torch.float32  # the head computes in float32
    # The very tensors are back (not copies), bit for bit, and the head's forward is the class's.
    assert storage_of(model) == before
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], copies[name]) for name in copies)
    assert "forward" not in vars(head)


def test_an_untied_head_stays_float32_and_is_not_cast():
    model = tiny_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    with torch.no_grad(), compute_in(BF16, model):
        assert model.lm_head.weight.dtype == torch.float32
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.dtype == torch.float32


def test_while_training_only_frozen_weights_are_cast():
    model = tiny_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = model.model.layers[0].self_attn.q_proj.weight
    trained.requires_grad_(True)
    with compute_in(BF16, model):
        assert trained.dtype == torch.float32  # a master weight
        assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16
        loss = model(input_ids=torch.tensor([[5, 6, 7]])).logits.float().pow(2).mean()
    loss.backward()
    assert trained.grad is not None and trained.grad.dtype == torch.float32
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.float32


def test_float32_changes_nothing():
    model = tiny_llama()
    before = storage_of(model)
    with torch.no_grad(), compute_in(FP32, model):
        assert not torch.is_autocast_enabled("cpu")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert storage_of(model) == before


def test_routed_factors_compute_in_bf16_while_routers_decide_in_float32(tokenizer):
    model = tiny_llama()
    experts = [random_expert(model, name=f"e{i}", rank=2, seed=i) for i in range(4)]
    routed = build_routed_model(model, experts, method="phatgoose", top_k=2)
    layers = [m for m in routed.modules() if isinstance(m, RoutedLinear)]
    factors = [(layer.lora_A, layer.lora_B) for layer in layers]
    u = torch.randn(3, 7, layers[0].in_features)
    expected = layers[0].router(u)
    with torch.no_grad(), compute_in(BF16, routed):
        assert {layer.lora_A.dtype for layer in layers} == {torch.bfloat16}
        indices, weights = layers[0].router(u)
        out = layers[0](u)
        scores = score_choices(routed, tokenizer, EXAMPLES, progress=False, precision="bfloat16")
    # The same experts with the same float32 weights as outside autocast.
    assert torch.equal(indices, expected[0]) and weights.dtype == torch.float32
    assert torch.equal(weights, expected[1])
    assert out.dtype == torch.bfloat16
    reference = layers[0](u)
    # bfloat16 keeps 8 significant bits; a rank-2 update of 32-wide inputs stays within 3e-2.
    assert torch.allclose(out.float(), reference, rtol=3e-2, atol=3e-2)
    assert all(
        layer.lora_A is a and layer.lora_B is b
        for layer, (a, b) in zip(layers, factors, strict=True)
    )
    assert all(len(row) == len(ex.choices) for row, ex in zip(scores, EXAMPLES, strict=True))
    unroute_model(routed)


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_bf16_scores_stay_near_float32_and_the_precision_is_recorded(make, tokenizer):
    model = make()
    low = score_choices(model, tokenizer, EXAMPLES, progress=False, precision="bfloat16")
    high = score_choices(model, tokenizer, EXAMPLES, progress=False, precision="float32")
    # Mean log-probabilities of a random tiny model are ~ -4.6 (100 tokens); bfloat16
    # products move them by well under 0.05.
    for row_low, row_high in zip(low, high, strict=True):
        assert row_low == pytest.approx(row_high, abs=0.05)
    assert low != high  # bfloat16 did compute something differently
    result = evaluate_task(
        model, tokenizer, EXAMPLES, task="t", progress=False, precision="bfloat16"
    )
    assert result.precision == "bfloat16"
    default = evaluate_task(model, tokenizer, EXAMPLES, task="t", progress=False)
    assert default.precision == "float32"  # auto, pinned for the suite


@pytest.mark.parametrize("make", [tiny_llama, tiny_t5])
def test_bf16_training_learns_keeps_float32_experts_and_records_its_precision(make, tokenizer):
    model = make()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = dataclasses.replace(CONFIG, precision="bfloat16")
    loss_before = mean_target_loss(model, tokenizer, TASK, max_length=32)
    base_dtypes: list[torch.dtype] = []
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    hook = first.register_forward_pre_hook(lambda m, args: base_dtypes.append(m.weight.dtype))
    expert = train_expert(model, tokenizer, TASK, name="alice/caps", config=config, progress=False)
    expert = train_gates(model, tokenizer, expert, TASK, config=config, progress=False)
    hook.remove()
    # The frozen base computed from bf16 copies in every step and validation; only the
    # check of whether sequences can be packed (three forwards, causal models) is float32.
    assert base_dtypes.count(torch.bfloat16) >= config.steps + config.resolved_gate_steps
    assert base_dtypes.count(torch.float32) <= 3
    training = expert.manifest.training
    assert (training.precision, training.gate_precision) == ("bfloat16", "bfloat16")
    assert all(t.dtype == torch.float32 for t in expert.lora_weights.values())
    assert all(t.dtype == torch.float32 for t in (expert.gates or {}).values())
    # It learns as float32 does (an autocast cache kept stale bfloat16 copies of the LoRA
    # weights after the first step once: the loss never moved).
    reference = train_expert(
        make(), tokenizer, TASK, name="alice/caps", config=CONFIG, progress=False
    ).manifest.training.best_validation_loss
    assert reference is not None and reference < loss_before - 0.1
    assert training.best_validation_loss == pytest.approx(reference, abs=0.02)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert all(after[name].dtype == torch.float32 for name in after)
