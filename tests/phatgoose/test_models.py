import types

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from phatgoose.models import (
    CACHE_KEYWORDS,
    DEFAULT_BASE_MODEL,
    base_model_spec,
    cache_keyword,
    cache_root,
    default_target_modules,
    forward_accepts,
    linear_module_paths,
    load_base_model,
    model_fingerprint,
    passed_cache,
    returned_cache,
)
from tests.tiny import tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_fingerprint_is_equal_for_identically_seeded_models():
    assert model_fingerprint(tiny_llama(seed=3)) == model_fingerprint(tiny_llama(seed=3))


def test_fingerprint_has_sha256_format():
    fingerprint = model_fingerprint(tiny_llama())
    assert fingerprint.startswith("sha256:")
    assert len(fingerprint) == len("sha256:") + 64
    int(fingerprint.removeprefix("sha256:"), 16)


def test_fingerprint_differs_for_different_seeds():
    assert model_fingerprint(tiny_llama(seed=0)) != model_fingerprint(tiny_llama(seed=1))


def test_fingerprint_changes_after_an_in_place_weight_update(llama):
    before = model_fingerprint(llama)
    with torch.no_grad():
        llama.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert model_fingerprint(llama) != before


def test_fingerprint_changes_after_a_weight_is_replaced(llama):
    before = model_fingerprint(llama)
    layer = llama.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone() * 2)
    assert model_fingerprint(llama) != before


def test_fingerprint_counts_tied_weights_once(llama):
    # The tiny llama ties lm_head to the input embeddings; untying (same values, own
    # storage) adds a tensor to the hash.
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    tied = model_fingerprint(llama)
    llama.lm_head.weight = torch.nn.Parameter(llama.lm_head.weight.detach().clone())
    assert model_fingerprint(llama) != tied


def test_fingerprint_depends_on_dtype(llama):
    before = model_fingerprint(llama)
    assert model_fingerprint(llama.to(torch.float64)) != before


def test_default_targets_of_llama_are_attention_and_mlp_projections(llama):
    assert default_target_modules(llama) == LLAMA_TARGETS


def test_default_targets_of_t5_are_attention_and_feed_forward(t5):
    assert default_target_modules(t5) == ["q", "k", "v", "o", "wi", "wo"]


def test_default_targets_of_gated_t5_include_both_input_projections():
    config = T5Config(
        vocab_size=16,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    model = T5ForConditionalGeneration(config)
    assert default_target_modules(model) == ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def test_linear_module_paths_exclude_the_output_head(llama):
    paths = linear_module_paths(llama)
    assert len(paths) == 2 * len(LLAMA_TARGETS)
    assert paths[0] == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in paths


def test_linear_module_paths_filter_by_target(t5):
    paths = linear_module_paths(t5, ["wo"])
    assert paths == [
        "encoder.block.0.layer.1.DenseReluDense.wo",
        "encoder.block.1.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.2.DenseReluDense.wo",
        "decoder.block.1.layer.2.DenseReluDense.wo",
    ]


def test_linear_module_paths_reject_unknown_targets(llama):
    with pytest.raises(ValueError, match=r"no attention/MLP nn\.Linear module matches"):
        linear_module_paths(llama, ["query"])


def test_base_model_spec_lists_every_target_with_its_shape(llama):
    spec = base_model_spec(llama, "tiny-llama", revision="r1")
    assert spec.architecture == "llama"
    assert not spec.is_encoder_decoder
    assert spec.revision == "r1"
    assert spec.fingerprint == model_fingerprint(llama)
    assert len(spec.linear_modules) == 14
    q = spec.module("model.layers.0.self_attn.q_proj")
    assert (q.in_features, q.out_features) == (32, 32)
    k = spec.module("model.layers.0.self_attn.k_proj")
    assert (k.in_features, k.out_features) == (32, 16)  # 2 key/value heads of 8
    down = spec.module("model.layers.1.mlp.down_proj")
    assert (down.in_features, down.out_features) == (64, 32)


def test_base_model_spec_of_t5_is_encoder_decoder(t5):
    spec = base_model_spec(t5, "tiny-t5")
    assert spec.architecture == "t5"
    assert spec.is_encoder_decoder
    wi = spec.module("decoder.block.1.layer.2.DenseReluDense.wi")
    assert (wi.in_features, wi.out_features) == (32, 64)


@pytest.mark.slow
def test_smollm2_loads_from_the_converted_cache():
    if not (cache_root() / "models" / DEFAULT_BASE_MODEL / "phatgoose-source.json").is_file():
        pytest.skip("SmolLM2 is not converted yet (the first load_base_model() takes ~45 s)")
    model, tokenizer = load_base_model()
    assert model.config.model_type == "llama"
    assert default_target_modules(model) == LLAMA_TARGETS
    assert len(linear_module_paths(model)) == 30 * 7
    assert tokenizer.pad_token is not None


# transformers 5.24 renamed `past_key_values` to `cache` (argument and output field); the
# scoring and retrieval code must read a cache under either name.
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_is_found_under_either_spelling(name):
    marker = object()
    assert passed_cache({name: marker, "input_ids": None}) is marker
    assert returned_cache(types.SimpleNamespace(**{name: marker})) is marker


def test_no_cache_passed_is_none_and_none_returned_is_an_error():
    assert passed_cache({"cache": None, "past_key_values": None}) is None
    with pytest.raises(ValueError, match="returned no key/value cache"):
        returned_cache(types.SimpleNamespace(logits=1))


def test_cache_keyword_is_the_one_the_installed_transformers_takes():
    keyword = cache_keyword(tiny_llama())
    assert keyword in CACHE_KEYWORDS
    assert forward_accepts(tiny_llama(), keyword)
