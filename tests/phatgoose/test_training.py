import dataclasses
import logging
import re
import types

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from torch import nn

import phatgoose.embeddings
from phatgoose.data import Example, collate_for_training, pack_sequences
from phatgoose.expert import Expert, ExpertError
from phatgoose.models import linear_module_paths, model_fingerprint
from phatgoose.routing import build_routed_model, routing_state
from phatgoose.routing.layer import RoutedLinear, stack_updates
from phatgoose.routing.routers import GateRouter
from phatgoose.training import (
    TrainingConfig,
    compute_average_activations,
    compute_retrieval_embeddings,
    expert_from_peft,
    gated_lora,
    mean_target_loss,
    packs_sequences,
    split_validation,
    train_expert,
    train_gates,
)
from phatgoose.training.gates import gate_of
from phatgoose.training.lora import _warmup_then_linear_decay
from tests.tiny import tiny_llama, tiny_t5, tiny_tokenizer

MAKERS = {"llama": tiny_llama, "t5": tiny_t5}
# A learnable mapping: the first letter of the prompt, doubled and upper-cased.
TASK = [
    Example(prompt=f"{c}{d} ->", target=f"{c}{c}".upper()) for c in "abcdefgh" for d in "abcdefgh"
]
CONFIG = TrainingConfig(
    r=4,
    lora_alpha=8,
    steps=24,
    batch_size=8,
    learning_rate=2e-2,
    max_length=32,
    eval_every=8,
    validation_fraction=0.2,
    gate_steps=16,
    gate_learning_rate=0.1,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run fastest on one thread, above all on a shared, busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": dict(model.named_modules()),
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "config": model.config.to_dict(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    modules = dict(model.named_modules())
    assert modules.keys() == before["modules"].keys()
    assert all(modules[k] is m for k, m in before["modules"].items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == before["requires_grad"]
    assert {k: m.training for k, m in model.named_modules()} == before["training"]
    assert model.config.to_dict() == before["config"]


@pytest.fixture(scope="module", params=["llama", "t5"])
def trained(request, one_thread):
    """A model, its state before training, the LoRA expert and the gated expert."""
    tokenizer = tiny_tokenizer()
    model = MAKERS[request.param]()
    before = snapshot(model)
    rng_before = torch.get_rng_state()
    lora = train_expert(model, tokenizer, TASK, name="alice/caps", config=CONFIG, progress=False)
    after_lora = snapshot(model)
    gated = train_gates(model, tokenizer, lora, TASK, config=CONFIG, progress=False)
    rng_untouched = torch.equal(torch.get_rng_state(), rng_before)
    return types.SimpleNamespace(
        rng_untouched=rng_untouched,
        kind=request.param,
        model=model,
        tokenizer=tokenizer,
        before=before,
        after_lora=after_lora,
        lora=lora,
        gated=gated,
    )


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("r", 0),
        ("steps", 0),
        ("learning_rate", -1.0),
        ("validation_fraction", 1.0),
        ("target_modules", []),
    ],
)
def test_config_rejects_invalid_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainingConfig.{field} must be"):
        TrainingConfig(**{field: value})


def test_config_defaults_derive_from_steps():
    config = TrainingConfig(steps=95, learning_rate=1e-3)
    assert config.resolved_eval_every == 9
    assert config.resolved_gate_steps == 10
    assert config.resolved_gate_learning_rate == 1e-3
    assert (TrainingConfig().r, TrainingConfig().lora_alpha) == (16, 32.0)


def test_learning_rate_warms_up_linearly_then_decays_linearly():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = _warmup_then_linear_decay(optimizer, steps=10, warmup_ratio=0.2)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_validation_split_is_capped_seeded_and_keeps_training_data():
    many = [Example(prompt=str(i), target="t") for i in range(3000)]
    train, val = split_validation(many, TrainingConfig(validation_fraction=0.5))
    assert (len(train), len(val)) == (2800, 200)
    assert split_validation(many, TrainingConfig(validation_fraction=0.5)) == (train, val)
    three = many[:3]
    assert [len(s) for s in split_validation(three, TrainingConfig())] == [2, 1]
    assert [len(s) for s in split_validation(three, TrainingConfig(validation_fraction=0))] == [
        3,
        0,
    ]
    assert [len(s) for s in split_validation(many[:1], TrainingConfig())] == [1, 0]


# ------------------------------------------------------------------------- LoRA expert
def test_train_expert_lowers_validation_loss(trained):
    _, validation = split_validation(TASK, CONFIG)
    base_loss = mean_target_loss(trained.model, trained.tokenizer, validation)
    assert trained.lora.manifest.training.best_validation_loss < base_loss - 0.2


def test_train_expert_leaves_the_base_model_bit_identical(trained):
    assert_unchanged(trained.model, trained.before)


def test_training_leaves_the_callers_random_state_untouched(trained):
    assert trained.rng_untouched


def test_train_expert_returns_a_lora_only_expert_for_this_base(trained):
    expert, model = trained.lora, trained.model
    assert not expert.has_gates and expert.manifest.training.gate_steps == 0
    assert set(expert.module_paths()) == set(linear_module_paths(model))
    assert expert.manifest.base_model.fingerprint == model_fingerprint(model)
    assert expert.manifest.training.steps == CONFIG.steps
    assert expert.manifest.training.examples == len(split_validation(TASK, CONFIG)[0])
    assert expert.rank == 4 and expert.lora_update(expert.module_paths()[0])[2] == 2.0


def test_saved_expert_loads_in_peft_and_reproduces_its_validation_loss(trained, tmp_path):
    trained.gated.save(tmp_path)
    peft_model = PeftModel.from_pretrained(MAKERS[trained.kind](), tmp_path)
    _, validation = split_validation(TASK, CONFIG)
    loss = mean_target_loss(peft_model, trained.tokenizer, validation)
    assert loss == pytest.approx(trained.lora.manifest.training.best_validation_loss, abs=1e-5)


def test_save_load_round_trip_of_a_trained_expert_is_bit_exact(trained, tmp_path):
    loaded = Expert.load(trained.gated.save(tmp_path))
    assert loaded.manifest == trained.gated.manifest
    for mine, theirs in [
        (trained.gated.lora_weights, loaded.lora_weights),
        (trained.gated.gates, loaded.gates),
    ]:
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_checkpoint_is_the_state_of_the_best_validation_step(caplog, tmp_path):
    # Validation targets contradict the training targets: after the first few steps (which
    # learn the shared format) training makes validation worse, so the last step is not best.
    config = dataclasses.replace(CONFIG, steps=10, learning_rate=5e-2, warmup_ratio=0.0)
    examples = [Example(prompt=f"{c} ->", target="A") for c in "abcdefghijklmnop"]
    _, validation = split_validation(examples, config)
    examples = [Example(ex.prompt, target="B") if ex in validation else ex for ex in examples]
    validation = [ex for ex in examples if ex.target == "B"]
    tokenizer = tiny_tokenizer()

    def train(eval_every: int) -> Expert:
        config_ = dataclasses.replace(config, eval_every=eval_every)
        return train_expert(
            tiny_t5(), tokenizer, examples, name="a", config=config_, progress=False
        )

    with caplog.at_level(logging.INFO, logger="phatgoose.training"):
        every_step = train(eval_every=1)
    kept = int(re.search(r"kept step (\d+) ", caplog.text).group(1))
    assert 1 <= kept < config.steps
    last_step = train(eval_every=config.steps)  # the same run, evaluated only at its end
    best = every_step.manifest.training.best_validation_loss
    assert best < last_step.manifest.training.best_validation_loss - 0.05
    key = next(iter(every_step.lora_weights))
    assert not torch.equal(every_step.lora_weights[key], last_step.lora_weights[key])
    # The returned weights are the ones that scored `best`.
    peft_model = PeftModel.from_pretrained(tiny_t5(), every_step.save(tmp_path))
    assert mean_target_loss(peft_model, tokenizer, validation) == pytest.approx(best, abs=1e-5)


def test_resuming_starts_from_the_earlier_lora_and_keeps_its_shape(trained):
    """A negligible learning rate keeps the starting point (Adam moves each weight by about
    the learning rate per step): the resumed LoRA comes back as it was, which a fresh start
    would not; a real one moves it, keeping rank and modules."""
    still = dataclasses.replace(CONFIG, steps=2, learning_rate=1e-12, r=2, validation_fraction=0.0)
    kept = train_expert(
        trained.model,
        trained.tokenizer,
        TASK,
        name="alice/caps",
        config=still,
        progress=False,
        resume_from=trained.lora,
    )
    assert kept.lora_weights.keys() == trained.lora.lora_weights.keys()
    assert all(
        torch.allclose(kept.lora_weights[k], v, rtol=0, atol=1e-9)
        for k, v in trained.lora.lora_weights.items()
    )
    assert kept.lora_config.r == trained.lora.lora_config.r != still.r

    moving = dataclasses.replace(still, learning_rate=CONFIG.learning_rate)
    moved = train_expert(
        trained.model,
        trained.tokenizer,
        TASK,
        name="alice/caps",
        config=moving,
        progress=False,
        resume_from=trained.lora,
    )
    changed = [
        k for k, v in trained.lora.lora_weights.items() if not torch.equal(moved.lora_weights[k], v)
    ]
    assert changed and moved.lora_weights.keys() == trained.lora.lora_weights.keys()
    assert_unchanged(trained.model, trained.after_lora)


# ------------------------------------------------------------------------------- gates
def test_gated_layer_computes_the_gated_lora_formula():
    # Gate training's layer is the routed linear over one expert with a sigmoid gate router.
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    a, b = torch.randn(3, 6), torch.randn(5, 3)
    layer = RoutedLinear(base, *stack_updates([(a, b, 0.5)]), GateRouter(torch.randn(6)))
    u = torch.randn(2, 4, 6)
    # y = W u + scale * B A u * sigmoid(v^T u)
    expected = base(u) + 0.5 * (u @ a.T @ b.T) * torch.sigmoid(u @ gate_of(layer))[..., None]
    torch.testing.assert_close(layer(u), expected)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [
        "base_layer.weight",
        "base_layer.bias",
        "router.gate",
    ]


def test_gated_lora_restores_the_original_linears(trained):
    before = dict(trained.model.named_modules())
    with gated_lora(trained.model, trained.gated) as layers:
        path = trained.gated.module_paths()[0]
        assert trained.model.get_submodule(path) is layers[path]
        assert layers[path].base_layer is before[path]
    assert all(m is before[k] for k, m in trained.model.named_modules())


def test_a_gated_model_counts_as_routed_until_the_gates_are_taken_out(trained):
    with gated_lora(trained.model, trained.lora):
        assert routing_state(trained.model).method == "gates"
        with pytest.raises(RuntimeError, match=r"already routed \(gates over 1 experts\)"):
            build_routed_model(trained.model, [trained.gated])
    assert routing_state(trained.model) is None


def test_train_gates_changes_only_the_gates(trained):
    lora, gated = trained.lora, trained.gated
    assert gated.lora_weights.keys() == lora.lora_weights.keys()
    assert all(torch.equal(gated.lora_weights[k], v) for k, v in lora.lora_weights.items())
    assert gated.manifest.training.gate_steps == CONFIG.resolved_gate_steps == 16
    assert gated.manifest.training.steps == lora.manifest.training.steps
    for path, gate in gated.gates.items():
        assert gate.dtype == torch.float32 and gate.shape == (lora.lora_update(path)[0].shape[1],)
    assert any(gate.abs().max() > 1e-3 for gate in gated.gates.values())


def test_train_gates_leaves_the_base_model_bit_identical(trained):
    assert_unchanged(trained.model, trained.after_lora)


def test_trained_gates_lower_the_training_loss_from_the_zero_gate_start(trained):
    training, _ = split_validation(TASK, CONFIG)
    with gated_lora(trained.model, trained.lora):  # v = 0: every gate is sigmoid(0) = 0.5
        start = mean_target_loss(trained.model, trained.tokenizer, training)
    with gated_lora(trained.model, trained.gated, trained.gated.gates):
        end = mean_target_loss(trained.model, trained.tokenizer, training)
    assert end < start - 0.01


def test_train_gates_refuses_an_expert_for_other_modules(trained):
    other = tiny_llama(hidden_size=48) if trained.kind == "llama" else tiny_t5(d_model=48)
    with (
        pytest.warns(UserWarning, match="was made for base model"),
        pytest.raises(ExpertError, match=r"update is \d+x\d+ but the model's linear is"),
    ):
        train_gates(other, trained.tokenizer, trained.lora, TASK, config=CONFIG, progress=False)


@pytest.mark.parametrize("wrapped", [False, True])
def test_target_loss_is_the_cross_entropy_of_the_full_logits(llama, tokenizer, wrapped):
    # The loss takes logits only before target tokens (which sit at different positions in
    # each right-padded row); it must equal the cross-entropy over the full logits.
    model = llama
    if wrapped:  # PEFT passes logits_to_keep through to its base model
        config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        model = get_peft_model(llama, config)
    examples = [
        Example("a ->", target="XY"),
        Example("a much longer prompt ->", target="Z"),
        Example("b ->", target="W"),
    ]
    batch = collate_for_training(tokenizer, examples, max_length=64, is_encoder_decoder=False)
    # The loss below is computed on 2 packed rows: the long sequence, then the 2 short ones.
    assert packs_sequences(model)
    assert pack_sequences(batch)["input_ids"].shape == (2, batch["input_ids"].shape[1])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )
    got = mean_target_loss(model, tokenizer, examples, batch_size=3, max_length=64)
    assert got == pytest.approx(float(expected), abs=1e-5)


class PositionBlind(nn.Module):
    """Llama behind a forward that drops `position_ids`: packed sequences see each other."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_training_packs_sequences_only_where_the_model_keeps_them_apart(llama, tokenizer):
    assert packs_sequences(llama)
    assert packs_sequences(get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])))
    assert not packs_sequences(tiny_t5())
    blind = PositionBlind(llama)
    assert not packs_sequences(blind)
    # Unpacked (padded) rows give the model's true loss all the same.
    examples = [Example("a ->", target="XY"), Example("a much longer prompt ->", target="Z")]
    batch = collate_for_training(tokenizer, examples, max_length=64, is_encoder_decoder=False)
    with torch.no_grad():
        logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    )
    assert mean_target_loss(blind, tokenizer, examples, batch_size=2) == pytest.approx(
        float(expected), abs=1e-5
    )


# ---------------------------------------------------------------- average activations
EXAMPLES = [Example(prompt="ab ->", target="X"), Example(prompt="longer prompt ->", target="YZ")]


def test_average_activations_match_a_hand_computation_on_llama(llama, tokenizer):
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    averages = compute_average_activations(llama, tokenizer, paths, EXAMPLES, batch_size=2)

    # By hand, one unpadded example at a time: prompt + " " + target + EOS.
    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    layer1 = llama.model.layers[1]
    with torch.no_grad():
        for ex in EXAMPLES:
            text_ids = tokenizer(f"{ex.prompt} {ex.target}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[*text_ids, tokenizer.eos_token_id]])
            hidden = llama(input_ids=ids, output_hidden_states=True).hidden_states
            inputs[paths[0]].append(llama.model.layers[0].input_layernorm(hidden[0])[0])
            after_attention = (
                hidden[1]
                + layer1.self_attn(
                    layer1.input_layernorm(hidden[1]),
                    attention_mask=None,
                    position_embeddings=llama.model.rotary_emb(
                        hidden[1], torch.arange(ids.shape[1])[None]
                    ),
                )[0]
            )
            mlp = layer1.mlp
            normed = layer1.post_attention_layernorm(after_attention)
            inputs[paths[1]].append((mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))[0])
    for path in paths:
        expected = torch.cat(inputs[path]).mean(0)
        torch.testing.assert_close(averages[path], expected, rtol=1e-4, atol=1e-5)
        assert averages[path].dtype == torch.float32


def test_average_activations_of_the_lm_head_cover_every_token(llama, tokenizer):
    # The LM head is normally skipped (logits for one position); averaged, it needs them all.
    averages = compute_average_activations(llama, tokenizer, ["lm_head"], EXAMPLES, batch_size=2)
    finals = []
    with torch.no_grad():
        for ex in EXAMPLES:
            text_ids = tokenizer(f"{ex.prompt} {ex.target}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[*text_ids, tokenizer.eos_token_id]])
            finals.append(llama(input_ids=ids, output_hidden_states=True).hidden_states[-1][0])
    torch.testing.assert_close(averages["lm_head"], torch.cat(finals).mean(0), rtol=1e-4, atol=1e-5)


def test_average_activations_use_prompt_tokens_in_the_encoder_and_target_in_the_decoder(
    t5, tokenizer
):
    paths = [
        "encoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.0.layer.0.SelfAttention.q",
        "decoder.block.1.layer.1.EncDecAttention.k",  # reads the encoder's output
    ]
    averages = compute_average_activations(t5, tokenizer, paths, EXAMPLES, batch_size=2)

    inputs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    with torch.no_grad():
        for ex in EXAMPLES:
            prompt = torch.tensor([tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]])
            target = tokenizer(f" {ex.target}", add_special_tokens=False)["input_ids"]
            labels = torch.tensor([[*target, tokenizer.eos_token_id]])
            encoder_out = t5.encoder(input_ids=prompt).last_hidden_state[0]
            decoder_in = t5.prepare_decoder_input_ids_from_labels(labels)
            inputs[paths[0]].append(t5.encoder.block[0].layer[0].layer_norm(t5.shared(prompt))[0])
            inputs[paths[1]].append(
                t5.decoder.block[0].layer[0].layer_norm(t5.shared(decoder_in))[0]
            )
            inputs[paths[2]].append(encoder_out)
    for path in paths:
        expected = torch.cat(inputs[path]).mean(0)
        torch.testing.assert_close(averages[path], expected, rtol=1e-4, atol=1e-5)


def test_average_activations_refuse_a_path_that_is_not_a_linear(llama, tokenizer):
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' is not an nn.Linear"):
        compute_average_activations(llama, tokenizer, ["model.layers.0.mlp"], EXAMPLES)


# ----------------------------------------------------------------- retrieval embeddings
def test_retrieval_embeddings_embed_the_inputs_and_warn_about_privacy(monkeypatch):
    embedded: list[list[str]] = []

    def fake_embed_texts(texts: list[str]) -> torch.Tensor:
        embedded.append(list(texts))
        return torch.ones(len(texts), 384, dtype=torch.float64)

    monkeypatch.setattr(phatgoose.embeddings, "embed_texts", fake_embed_texts)
    with pytest.warns(UserWarning, match="leak information about that data"):
        embeddings = compute_retrieval_embeddings(TASK, max_examples=10)
    assert embeddings.shape == (10, 384) and embeddings.dtype == torch.float32
    assert len(set(embedded[0])) == 10 and set(embedded[0]) <= {ex.prompt for ex in TASK}


# ------------------------------------------------------------------- existing adapters
@pytest.fixture
def peft_adapter(tmp_path):
    """A PEFT LoRA adapter saved by PEFT itself, with non-zero B."""
    torch.manual_seed(3)
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(tiny_llama(), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, tmp_path / "adapter"


def test_expert_from_peft_directory_keeps_the_adapter_and_has_no_gates(peft_adapter, tmp_path):
    peft_model, directory = peft_adapter
    expert = expert_from_peft(directory, name="bob/imported", base_model=tiny_llama())
    assert not expert.has_gates and expert.manifest.training.gate_steps == 0
    assert expert.manifest.base_model.fingerprint == model_fingerprint(tiny_llama())
    assert len(expert.module_paths()) == 4
    ids = torch.tensor([[5, 9, 20, 33]])
    reloaded = PeftModel.from_pretrained(tiny_llama(), expert.save(tmp_path / "expert"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_expert_from_peft_model_equals_expert_from_its_directory(peft_adapter):
    peft_model, directory = peft_adapter
    identity = expert_from_peft(directory, name="a", base_model=tiny_llama()).manifest.base_model
    from_dir = expert_from_peft(directory, name="a", base_model=identity)
    from_model = expert_from_peft(peft_model, name="a", base_model=identity)
    assert from_model.lora_weights.keys() == from_dir.lora_weights.keys()
    assert all(torch.equal(from_model.lora_weights[k], v) for k, v in from_dir.lora_weights.items())


def test_expert_from_peft_refuses_a_non_lora_adapter(tmp_path):
    config = IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    with pytest.raises(ExpertError, match="peft_type is 'IA3'; only LoRA adapters"):
        expert_from_peft(tmp_path, name="a", base_model=tiny_llama())


def test_expert_from_peft_never_reads_pickled_weights(peft_adapter):
    _, directory = peft_adapter
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(ExpertError, match=r"adapter_model.bin \(pickle\) .* never loaded"):
        expert_from_peft(directory, name="a", base_model=tiny_llama())


def test_train_expert_refuses_an_invalid_name(llama, tokenizer):
    with pytest.raises(ValueError, match="expert name 'Not Valid' is invalid"):
        train_expert(llama, tokenizer, TASK, name="Not Valid", config=CONFIG, progress=False)
