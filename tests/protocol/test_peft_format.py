"""`protocol.peft_format` against what PEFT itself does: keys, scaling, module selection."""

import math

import pytest
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from protocol import lora_key, lora_keys, lora_scale, matches_target_modules, parse_lora_key
from tests.tiny import tiny_llama

PATH = "model.layers.0.self_attn.q_proj"


def test_a_lora_key_is_the_wrapped_module_name_without_the_adapter_name():
    assert lora_key(PATH, "A") == f"base_model.model.{PATH}.lora_A.weight"
    assert lora_keys(PATH) == (lora_key(PATH, "A"), lora_key(PATH, "B"))


def test_only_lora_a_and_b_have_keys():
    with pytest.raises(ValueError, match="'A' or 'B'"):
        lora_key(PATH, "C")  # type: ignore[arg-type]


def test_parsing_a_key_gives_back_the_module_path_and_matrix():
    assert parse_lora_key(lora_key(PATH, "B")) == (PATH, "B")
    for not_lora in (f"{PATH}.lora_A.weight", f"base_model.model.{PATH}.weight", PATH + ".gate"):
        assert parse_lora_key(not_lora) is None


@pytest.mark.parametrize("use_rslora", [False, True])
def test_keys_scale_and_selection_are_what_peft_saves_and_computes(use_rslora):
    targets = ["q_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=use_rslora)
    peft_model = get_peft_model(tiny_llama(), config)
    adapted = {
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }

    saved = set(get_peft_model_state_dict(peft_model))
    assert saved == {key for path in adapted for key in lora_keys(path)}
    assert {parse_lora_key(key)[0] for key in saved} == adapted  # type: ignore[index]
    all_linears = {p for p, _ in tiny_llama().named_modules() if p.endswith("_proj")}
    assert {p for p in all_linears if matches_target_modules(p, targets)} == adapted
    expected_scale = 6 / math.sqrt(4) if use_rslora else 6 / 4
    assert lora_scale(4, 6.0, use_rslora) == pytest.approx(expected_scale)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            assert module.scaling["default"] == pytest.approx(lora_scale(4, 6.0, use_rslora))


def test_a_target_name_matches_a_whole_trailing_component_only():
    assert matches_target_modules("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert matches_target_modules("lm_head", ["lm_head"])
    assert not matches_target_modules("model.layers.0.self_attn.xq_proj", ["q_proj"])
    assert not matches_target_modules("model.layers.0.self_attn.q_proj", [])
