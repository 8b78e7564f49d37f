"""The routing-cost runner on a tiny model: every configuration measured, floors, and the
dense reference computing exactly what the selected-only routed model computes."""

import pytest
import torch

from benchmarks.dense_reference import DenseRoutedLinear, densify, undensify
from benchmarks.routing_cost import (
    RoutingCostConfig,
    Shapes,
    add_task_adapters,
    markdown_table,
    peft_lora_config,
    plot,
    prompt_routed,
    random_routed_layers,
    run_routing_cost,
    swapped,
)
from phatgoose.models import default_target_modules
from phatgoose.routing import build_routed_model
from phatgoose.routing.routers import PromptDecisions, PromptRouter, SpectralRouter, TokenRouter
from phatgoose.routing.rows import spectral_basis
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama, tiny_tokenizer


def tiny_model_and_tokenizer():
    return tiny_llama(), tiny_tokenizer()


def tiny_config(**overrides):
    values = dict(
        batch_size=2,
        seq_len=8,
        repeats=1,
        warmup=0,
        n_experts=[2, 4],
        rank=2,
        top_k=2,
        train_steps=1,
        paper_lora_steps=20,
        decode_repeats=1,
    )
    values.update(overrides)
    return RoutingCostConfig(**values)


def test_runner_measures_every_configuration_with_a_floor_in_each_precision(tmp_path):
    output = tmp_path / "cost.json"
    record = run_routing_cost(
        tiny_config(reference_max_n=2),
        model_factory=tiny_model_and_tokenizer,
        isolate=False,
        output=output,
        progress=False,
    )
    assert set(record["precisions"]) == {"float32", "bfloat16"}
    assert record["precisions"]["bfloat16"]["precision"] == "bfloat16"
    seen = {(r["implementation"], r["n_experts"], r["precision"]) for r in record["results"]}
    configurations = {
        ("base", None),
        ("lora", None),
        *(
            (impl, n)
            for impl in ("phatgoose", "spectr", "smear", "dense", "arrow_peft")
            for n in (2, 4)
        ),
    }
    assert seen == {(*c, p) for c in configurations for p in ("float32", "bfloat16")}
    skipped = {
        (r["implementation"], r["n_experts"], r["precision"])
        for r in record["results"]
        if r["status"] == "skipped"
    }
    assert skipped == {
        ("dense", 4, "float32"),  # above reference_max_n
        ("arrow_peft", 4, "float32"),
        ("arrow_peft", 4, "bfloat16"),
        ("dense", 2, "bfloat16"),  # the dense reference runs in float32 only
        ("dense", 4, "bfloat16"),
    }
    for r in record["results"]:
        if (r["implementation"], r["n_experts"], r["precision"]) in skipped:
            continue
        assert r["status"] == "ok", r
        assert r["precision_record"]["precision"] == r["precision"]
        assert r["latency_s"] > 0 and r["base_latency_s"] > 0 and r["tokens_per_s"] > 0
        assert r["ratio_to_base"] == pytest.approx(r["latency_s"] / r["base_latency_s"])
        assert r["decode_ratio_to_base"] == pytest.approx(
            r["decode_latency_s"] / r["decode_base_latency_s"]
        )
        assert r["peak_rss_mb"] > 0
        if r["implementation"] == "base":
            assert r["floor_ratio"] == r["decode_floor_ratio"] == 1.0
        else:
            assert r["floor_ratio"] > 1.0 and r["decode_floor_ratio"] > 1.0
            assert r["measured_over_floor"] == pytest.approx(r["ratio_to_base"] / r["floor_ratio"])
            assert r["decode_measured_over_floor"] == pytest.approx(
                r["decode_ratio_to_base"] / r["decode_floor_ratio"]
            )
    floors = {
        r["n_experts"]: r["floor_ratio"]
        for r in record["results"]
        if r["implementation"] == "phatgoose"
    }
    assert floors[4] > floors[2]
    # dense and arrow_peft lack N=4
    assert set(record["growth"]["float32"]) == {"phatgoose", "spectr", "smear"}
    for precision in ("float32", "bfloat16"):
        training = record["training"][precision]
        assert training["status"] == "ok" and training["precision"] == precision
        assert training["lora_step_s"] > 0 and training["gate_step_s"] > 0
        assert training["gate_steps"] == 2  # a tenth of paper_lora_steps
        assert training["gate_over_lora_total"] == pytest.approx(
            training["gate_total_s"] / training["lora_total_s"]
        )
    speedups = record["speedups"]
    measured_both = {(f["implementation"], f["n_experts"]) for f in speedups["forwards"]}
    assert measured_both == configurations - {("dense", 2), ("dense", 4), ("arrow_peft", 4)}
    assert all(f["forward"] > 0 and f["one_token"] > 0 for f in speedups["forwards"])
    assert speedups["lora_step"] > 0 and speedups["gate_step"] > 0
    assert output.is_file()
    table = markdown_table(record)
    assert (
        "arrow_peft" in table and "bfloat16 speed-up" in table and "| bfloat16 | gates |" in table
    )
    assert plot(record, tmp_path / "cost.png").stat().st_size > 0


def test_one_precision_and_no_decoding_measure_only_that():
    record = run_routing_cost(
        tiny_config(precisions=["float32"], decode=False, implementations=["phatgoose"]),
        model_factory=tiny_model_and_tokenizer,
        isolate=False,
        training=False,
        progress=False,
    )
    assert {r["precision"] for r in record["results"]} == {"float32"}
    assert all("decode_latency_s" not in r for r in record["results"])
    assert record["speedups"] == {"forwards": []}
    with pytest.raises(ValueError, match="precisions must be among"):
        RoutingCostConfig(precisions=["float16"])


@pytest.mark.slow  # two spawned interpreters import torch: seconds on an idle machine
def test_isolated_runs_measure_in_fresh_processes(tmp_path):
    record = run_routing_cost(
        tiny_config(implementations=["phatgoose"], n_experts=[2]),
        model_factory=tiny_model_and_tokenizer,
        isolate=True,
        training=False,
        progress=False,
    )
    assert [r["status"] for r in record["results"]] == ["ok"] * 4  # base, phatgoose; 2 dtypes
    assert all(r["extra_rss_mb"] >= 0 for r in record["results"])


@pytest.mark.slow  # a spawned interpreter imports torch
def test_a_configuration_past_its_time_is_reported_not_finished():
    record = run_routing_cost(
        tiny_config(
            implementations=["phatgoose"],
            n_experts=[2],
            precisions=["float32"],
            config_timeout_s=0.01,
        ),
        model_factory=tiny_model_and_tokenizer,
        isolate=True,
        training=False,
        progress=False,
    )
    for r in record["results"]:
        assert r["status"] == "not finished"
        assert "stopped after 0 s (config_timeout_s)" in r["error"]


def test_floor_counts_affinities_and_k_low_rank_products():
    shapes = Shapes(linears=[(4, 6), (6, 4)], layers=1, attention_width=4, hidden=4, vocab=10)
    assert shapes.base_flops(seq_len=3) == 2 * 24 * 2 + 2 * 2 * 2 * 4 + 2 * 4 * 10 / 3
    # one cached token: attention over the 3 + 1 positions, the head on that token
    assert shapes.decode_flops(context=3) == 2 * 24 * 2 + 2 * 2 * 4 * 4 + 2 * 4 * 10
    # per module: 2 N n + 2 k r (n + d)
    assert shapes.extra_flops("phatgoose", 8, rank=2, top_k=2) == (2 * 8 * 4 + 2 * 2 * 2 * 10) + (
        2 * 8 * 6 + 2 * 2 * 2 * 10
    )
    assert shapes.extra_flops("lora", 8, rank=2, top_k=2) == 2 * 2 * 10 * 2
    assert shapes.dense_flops(8, rank=2) == (2 * 8 * 4 + 2 * 8 * 2 * 10) + (
        2 * 8 * 6 + 2 * 8 * 2 * 10
    )


def test_spectr_floor_scores_against_every_experts_singular_vectors():
    shapes = Shapes(linears=[(4, 6), (6, 4)], layers=1, attention_width=4, hidden=4, vocab=10)
    # per module: 2 N r n (scores) + 2 k r (n + d), against PHATGOOSE's 2 N n affinities
    assert shapes.extra_flops("spectr", 8, rank=3, top_k=2) == (2 * 8 * 3 * 4 + 2 * 2 * 3 * 10) + (
        2 * 8 * 3 * 6 + 2 * 2 * 3 * 10
    )
    assert shapes.extra_flops("spectr", 8, rank=1, top_k=2) == shapes.extra_flops(
        "phatgoose", 8, rank=1, top_k=2
    )


def test_spectr_layers_route_the_same_experts_by_their_spectral_rows(llama):
    spectr = random_routed_layers(llama, n_experts=6, rank=3, top_k=2, seed=0, router="spectr")
    phatgoose = random_routed_layers(llama, n_experts=6, rank=3, top_k=2, seed=0)
    assert spectr.keys() == phatgoose.keys()
    for path, layer in spectr.items():
        assert isinstance(layer.router, SpectralRouter)
        assert isinstance(phatgoose[path].router, TokenRouter)
        assert torch.equal(layer.lora_A, phatgoose[path].lora_A)
        assert torch.equal(layer.lora_B, phatgoose[path].lora_B)
        expected = spectral_basis(layer.lora_A, layer.lora_B)  # scale folded into B: 1
        assert torch.equal(layer.router.bases, expected)
        assert expected.shape == (6, 3, layer.in_features)
    ids = torch.randint(0, llama.config.vocab_size, (2, 5))
    with torch.no_grad():
        with swapped(llama, spectr):
            routed = llama(input_ids=ids).logits
        with swapped(llama, {p: DenseRoutedLinear(layer) for p, layer in spectr.items()}):
            dense = llama(input_ids=ids).logits
        with swapped(llama, phatgoose):
            by_gates = llama(input_ids=ids).logits
    torch.testing.assert_close(dense, routed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(by_gates, routed)  # another router chooses other experts
    with pytest.raises(
        ValueError, match=r"router must be one of \['phatgoose', 'spectr', 'smear'\]"
    ):
        random_routed_layers(llama, n_experts=2, rank=2, top_k=2, seed=0, router="arrow")


def test_runner_measures_spectr_beside_phatgoose_with_its_own_floor():
    record = run_routing_cost(
        tiny_config(precisions=["float32"], implementations=["phatgoose", "spectr"]),
        model_factory=tiny_model_and_tokenizer,
        isolate=False,
        training=False,
        progress=False,
    )
    rows = {(r["implementation"], r["n_experts"]): r for r in record["results"]}
    assert set(rows) == {("base", None), *((i, n) for i in ("phatgoose", "spectr") for n in (2, 4))}
    for n in (2, 4):
        spectr, phatgoose = rows["spectr", n], rows["phatgoose", n]
        assert spectr["status"] == "ok" and spectr["latency_s"] > 0, spectr
        assert "decode_latency_s" in spectr
        # rank 2: scoring against 2 singular vectors per expert instead of one gate row
        assert spectr["floor_ratio"] > phatgoose["floor_ratio"]
        assert spectr["expert_weights_mb"] > phatgoose["expert_weights_mb"]
    assert set(record["growth"]["float32"]) == {"phatgoose", "spectr"}
    assert "| float32 | spectr | 4 |" in markdown_table(record)


def test_dense_reference_equals_the_routed_phatgoose_model(llama):
    experts = [random_expert(llama, name=f"e{z}", rank=2 + z % 3, seed=z) for z in range(5)]
    ids = torch.randint(0, llama.config.vocab_size, (3, 7))
    with torch.no_grad():
        build_routed_model(llama, experts, "phatgoose", top_k=2)
        routed = llama(input_ids=ids).logits
        replaced = densify(llama)
        assert replaced and all(
            isinstance(llama.get_submodule(p), DenseRoutedLinear) for p in replaced
        )
        dense = llama(input_ids=ids).logits
        undensify(llama, replaced)
        again = llama(input_ids=ids).logits
    torch.testing.assert_close(dense, routed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, routed)


def test_dense_reference_equals_the_benchmarks_random_routed_layers(llama):
    layers = random_routed_layers(llama, n_experts=6, rank=3, top_k=2, seed=0)
    ids = torch.randint(0, llama.config.vocab_size, (2, 5))
    with torch.no_grad():
        with swapped(llama, layers):
            routed = llama(input_ids=ids).logits
        with swapped(llama, {p: DenseRoutedLinear(layer) for p, layer in layers.items()}):
            dense = llama(input_ids=ids).logits
        base = llama(input_ids=ids).logits
    torch.testing.assert_close(dense, routed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, routed)  # the experts do change the output


def test_task_adapters_are_added_as_peft_add_adapter_adds_them():
    from peft import get_peft_model

    def with_adapters(add):
        model = tiny_llama()
        targets = default_target_modules(model)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, peft_lora_config(targets, 2), adapter_name="task_0")
        add(peft_model, targets)
        return peft_model

    def one_by_one(peft_model, targets):
        for i in (1, 2):
            peft_model.add_adapter(f"task_{i}", peft_lora_config(targets, 2))

    reference = with_adapters(one_by_one)
    fast = with_adapters(lambda m, targets: add_task_adapters(m, 3, targets, 2))
    assert (
        sorted(fast.peft_config) == sorted(reference.peft_config) == ["task_0", "task_1", "task_2"]
    )
    expected = reference.state_dict()
    state = fast.state_dict()
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    inputs = torch.randint(4, 50, (1, 6))
    for name in ("task_1", "task_2"):
        reference.set_adapter(name)
        fast.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(fast(input_ids=inputs).logits, reference(input_ids=inputs).logits)


def test_smear_floor_is_every_experts_product_and_its_layers_merge_per_example(llama):
    shapes = Shapes(linears=[(4, 6), (6, 4)], layers=1, attention_width=4, hidden=4, vocab=10)
    assert shapes.extra_flops("smear", 8, rank=3, top_k=2) == 2 * (2 * 8 * 3 * 10)
    decisions = PromptDecisions()
    smear = random_routed_layers(
        llama, n_experts=5, rank=3, top_k=2, seed=0, router="smear", decisions=decisions
    )
    phatgoose = random_routed_layers(llama, n_experts=5, rank=3, top_k=2, seed=0)
    ids = torch.randint(0, llama.config.vocab_size, (2, 5))
    with torch.no_grad(), prompt_routed(llama, smear, decisions):
        first = llama(input_ids=ids).logits
        again = llama(input_ids=ids).logits  # a new sequence: decided again, the same way
    assert decisions.epoch == 2
    torch.testing.assert_close(first, again)
    for path, layer in smear.items():
        assert isinstance(layer.router, PromptRouter) and layer.router.top_k is None
        assert torch.equal(layer.lora_A, phatgoose[path].lora_A)
        _, indices, weights = decisions.kept[path]
        assert indices.shape == weights.shape == (2, 1, 5)  # every expert, per example
    with pytest.raises(ValueError, match="decisions= is for router 'smear'"):
        random_routed_layers(llama, n_experts=2, rank=2, top_k=2, seed=0, router="smear")
