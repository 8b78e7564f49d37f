import dataclasses
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

from phatgoose.expert import Expert, ExpertError
from protocol import MANIFEST_FILE, RETRIEVAL_FILE, ROUTER_FILE, lora_key
from tests.phatgoose.experts import random_expert
from tests.tiny import tiny_llama


@pytest.fixture
def expert(llama):
    return random_expert(llama, name="alice/demo", rank=4, seed=1, with_average_activation=True)


def test_module_paths_are_base_model_paths_in_layer_order(llama):
    expert = random_expert(llama, name="a", rank=2, seed=0, target_modules=["q_proj", "v_proj"])
    assert expert.module_paths() == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_module_paths_compare_layer_numbers_as_numbers():
    model = tiny_llama(layers=11)
    expert = random_expert(model, name="a", rank=2, seed=0, target_modules=["q_proj"])
    assert expert.module_paths()[2:4] == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.3.self_attn.q_proj",
    ]
    assert expert.module_paths()[-1] == "model.layers.10.self_attn.q_proj"


def test_lora_update_returns_peft_tensors_and_alpha_over_r(expert):
    path = "model.layers.1.mlp.down_proj"
    a, b, scale = expert.lora_update(path)
    assert a is expert.lora_weights[f"base_model.model.{path}.lora_A.weight"]
    assert b is expert.lora_weights[f"base_model.model.{path}.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)
    assert scale == 8 / 4


def test_lora_update_scale_is_alpha_over_sqrt_r_with_rslora(expert):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=list(expert.lora_config.target_modules), use_rslora=True
    )
    rs = dataclasses.replace(expert, lora_config=config)
    assert rs.lora_update(rs.module_paths()[0])[2] == pytest.approx(8 / math.sqrt(4))


def test_lora_update_of_unknown_path_names_it(expert):
    with pytest.raises(KeyError, match="lm_head"):
        expert.lora_update("lm_head")


def test_rank_and_name_come_from_weights_and_manifest(expert):
    assert expert.rank == 4
    assert expert.name == "alice/demo"
    assert expert.has_gates


def test_save_load_round_trip_is_bit_exact(expert, tmp_path):
    expert = expert.with_retrieval_embeddings(torch.randn(5, 384))
    loaded = Expert.load(expert.save(tmp_path / "pkg"))
    assert loaded.manifest == expert.manifest
    assert loaded.lora_config.to_dict() == expert.lora_config.to_dict()
    for mine, theirs in [
        (expert.lora_weights, loaded.lora_weights),
        (expert.gates, loaded.gates),
        (expert.average_activations, loaded.average_activations),
    ]:
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(loaded.retrieval_embeddings, expert.retrieval_embeddings)


def test_router_file_uses_protocol_keys(expert, tmp_path):
    expert.save(tmp_path)
    keys = set(load_file(str(tmp_path / ROUTER_FILE)))
    path = "model.layers.0.self_attn.q_proj"
    assert f"{path}.gate" in keys and f"{path}.average_activation" in keys
    assert len(keys) == 2 * len(expert.module_paths())


def test_saved_adapter_loads_in_peft_and_applies_scale_b_a(expert, llama, tmp_path):
    expert.save(tmp_path)
    ids = torch.tensor([[5, 17, 30, 42, 8]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(tiny_llama(), tmp_path)(input_ids=ids).logits
        # The same update merged by hand: W + scale * B @ A at every module.
        modules = dict(llama.named_modules())
        for path in expert.module_paths():
            a, b, scale = expert.lora_update(path)
            modules[path].weight += scale * b @ a
        manual_logits = llama(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, manual_logits, rtol=1e-4, atol=1e-5)


def test_lora_only_expert_saves_and_loads_without_gates(expert, tmp_path):
    lora_only = expert.with_gates({}, gate_steps=0)
    loaded = Expert.load(lora_only.save(tmp_path))
    assert not loaded.has_gates and loaded.manifest.training.gate_steps == 0


def test_with_gates_records_gate_steps_in_manifest(expert):
    gated = expert.with_gates(expert.gates, gate_steps=7, final_gate_loss=1.5)
    assert gated.manifest.training.gate_steps == 7
    assert gated.manifest.training.final_gate_loss == 1.5
    assert expert.manifest.training.gate_steps == 1  # the original is unchanged


def test_expert_without_gates_must_say_gate_steps_zero(expert):
    with pytest.raises(ExpertError, match="gate_steps=1 but there are no gates"):
        dataclasses.replace(expert, gates={})


def test_gate_of_wrong_width_names_module_and_expected_shape(expert):
    gates = dict(expert.gates)
    gates["model.layers.0.mlp.down_proj"] = torch.zeros(32)
    with pytest.raises(ExpertError, match=r"mlp.down_proj: gate must be float32 \[64\]"):
        dataclasses.replace(expert, gates=gates)


def test_gate_in_float16_is_refused(expert):
    gates = {p: g.half() for p, g in expert.gates.items()}
    with pytest.raises(ExpertError, match="float32"):
        dataclasses.replace(expert, gates=gates)


def test_missing_gate_for_one_module_is_refused(expert):
    gates = dict(expert.gates)
    del gates["model.layers.1.self_attn.k_proj"]
    with pytest.raises(ExpertError, match=r"no gate for 1 LoRA module.*layers.1.self_attn.k_proj"):
        dataclasses.replace(expert, gates=gates)


def test_lora_b_that_does_not_match_a_is_refused(expert):
    weights = dict(expert.lora_weights)
    weights[lora_key("model.layers.0.self_attn.q_proj", "B")] = torch.zeros(32, 3)
    with pytest.raises(ExpertError, match=r"q_proj: lora_A .* and lora_B .* do not form"):
        dataclasses.replace(expert, lora_weights=weights)


def test_non_peft_lora_key_is_refused(expert):
    weights = {**expert.lora_weights, "model.layers.0.self_attn.q_proj.weight": torch.zeros(1)}
    with pytest.raises(ExpertError, match="expected PEFT's key form"):
        dataclasses.replace(expert, lora_weights=weights)


def test_manifest_flag_must_match_average_activations(expert):
    with pytest.raises(ExpertError, match="has_average_activation=True"):
        dataclasses.replace(expert, average_activations=None)


def test_load_lists_missing_files(expert, tmp_path):
    expert.save(tmp_path)
    (tmp_path / ROUTER_FILE).unlink()
    with pytest.raises(ExpertError, match=r"missing package file\(s\) \['router.safetensors'\]"):
        Expert.load(tmp_path)


def test_load_refuses_non_lora_adapter(expert, tmp_path):
    expert.save(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = "IA3"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ExpertError, match="peft_type is 'IA3'; only LoRA"):
        Expert.load(tmp_path)


def test_load_refuses_unknown_router_tensor(expert, tmp_path):
    expert.save(tmp_path)
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, tmp_path / ROUTER_FILE)
    with pytest.raises(ExpertError, match=r"unexpected tensor '.*q_proj.bias'"):
        Expert.load(tmp_path)


def test_load_reports_invalid_manifest_with_its_file(expert, tmp_path):
    expert.save(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"name": "x"}')
    with pytest.raises(ExpertError, match=r"expert.json: invalid manifest"):
        Expert.load(tmp_path)


def test_saving_without_embeddings_removes_a_stale_retrieval_file(expert, tmp_path):
    expert.with_retrieval_embeddings(torch.randn(2, 384)).save(tmp_path)
    expert.save(tmp_path)
    assert not (tmp_path / RETRIEVAL_FILE).exists()
    assert Expert.load(tmp_path).retrieval_embeddings is None
