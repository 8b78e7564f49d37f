"""`phatgoose client train | import-peft | inspect` on a tiny model saved to disk."""

import json

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

from phatgoose.expert import Expert
from phatgoose.models import load_base_model, model_fingerprint
from protocol import MANIFEST_FILE, ROUTER_FILE
from tests.client.conftest import TINY_TRAINING, run_cli
from tests.client.helpers import save_tiny_base


def test_train_writes_an_expert_with_gates_and_the_requested_training(
    trained_package, tiny_base_dir
):
    expert = Expert.load(trained_package)

    assert expert.name == "quokka"
    assert expert.manifest.training.steps == 4
    assert expert.manifest.training.gate_steps == 3
    assert expert.manifest.training.examples == 11  # 12 minus one held out for validation
    assert expert.manifest.has_average_activation
    assert not expert.manifest.has_retrieval_embeddings
    model, _ = load_base_model(str(tiny_base_dir))
    assert expert.manifest.base_model.fingerprint == model_fingerprint(model)
    # Gates moved away from their zero start, on every adapted module.
    assert set(expert.gates) == set(expert.module_paths())
    assert all(gate.abs().max() > 0 for gate in expert.gates.values())


def test_inspect_says_a_trained_package_passes_admission(trained_package):
    result = run_cli("inspect", trained_package)

    assert result.exit_code == 0, result.output
    assert "passes admission" in result.output
    assert "14 modules" in result.output  # 2 layers x 7 linears of the tiny llama


def test_inspect_reports_which_check_failed_and_exits_1(trained_package, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in trained_package.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((tampered / MANIFEST_FILE).read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (tampered / MANIFEST_FILE).write_text(json.dumps(manifest))

    result = run_cli("inspect", tampered, "--base", manifest["base_model"]["name"])

    assert result.exit_code == 1
    assert "would be rejected" in result.output
    assert "check: fingerprint" in result.output
    assert f"file: {MANIFEST_FILE}" in result.output


def test_import_peft_keeps_the_adapter_weights_and_adds_trained_gates(
    tiny_base_dir, private_data, tmp_path
):
    model, _ = load_base_model(str(tiny_base_dir))
    torch.manual_seed(3)
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    adapter = tmp_path / "My Adapter"
    peft_model.save_pretrained(adapter)
    out = tmp_path / "imported"

    result = run_cli(
        "import-peft",
        adapter,
        "--data",
        private_data,
        "--base",
        tiny_base_dir,
        "--out",
        out,
        "--gate-steps",
        "3",
        "--batch-size",
        "4",
        "--max-length",
        "48",
        "--quiet",
    )

    assert result.exit_code == 0, result.output
    expert = Expert.load(out)
    assert expert.name == "my-adapter"
    assert expert.manifest.training.gate_steps == 3
    assert expert.manifest.training.steps == 0
    original = expert.lora_weights
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    assert len(expert.gates) == 4  # q_proj and v_proj in 2 layers
    assert all(gate.abs().max() > 0 for gate in expert.gates.values())


def test_train_resume_from_continues_the_earlier_versions_lora(
    trained_package, tiny_base_dir, private_data, tmp_path
):
    earlier = Expert.load(trained_package)
    out = tmp_path / "quokka-v2"
    # A learning rate too small to move anything: what comes out is where training started.
    still = [*TINY_TRAINING[: TINY_TRAINING.index("--lr")], "--lr", "1e-9", "--quiet"]

    result = run_cli(
        "train",
        "--data",
        private_data,
        "--name",
        "quokka",
        "--base",
        tiny_base_dir,
        "--out",
        out,
        "--resume-from",
        trained_package,
        "--rank",
        "2",  # ignored: the earlier version's rank is kept
        *still,
    )

    assert result.exit_code == 0, result.output
    resumed = Expert.load(out)
    assert resumed.rank == earlier.rank != 2
    assert resumed.module_paths() == earlier.module_paths()
    # A fresh LoRA starts with B = 0; this one started from the earlier version's B.
    b_keys = [k for k in earlier.lora_weights if "lora_B" in k]
    assert b_keys and all(earlier.lora_weights[k].abs().max() > 0 for k in b_keys)
    for key in b_keys:
        torch.testing.assert_close(resumed.lora_weights[key], earlier.lora_weights[key])


def test_train_resume_from_refuses_another_base_model_or_a_folder_without_a_package(
    trained_package, private_data, tmp_path
):
    other_base = save_tiny_base(tmp_path / "other-base", seed=1)
    common = ["--data", private_data, "--name", "quokka", "--out", tmp_path / "out"]

    other = run_cli(
        "train", *common, "--base", other_base, "--resume-from", trained_package, *TINY_TRAINING
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = run_cli(
        "train", *common, "--base", other_base, "--resume-from", empty, *TINY_TRAINING
    )

    assert other.exit_code == 2
    assert "cannot resume from quokka: it was trained on base model" in other.output
    assert nothing.exit_code == 2
    assert "--resume-from" in nothing.output and "empty" in nothing.output
    assert not (tmp_path / "out").exists()


def test_train_refuses_malformed_data_with_the_line_and_field(tiny_base_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "q", "target": "a"}\n{"input": "q", "traget": "a"}\n')

    result = run_cli(
        "train",
        "--data",
        data,
        "--name",
        "bad",
        "--base",
        tiny_base_dir,
        "--out",
        tmp_path / "out",
        *TINY_TRAINING,
    )

    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output
    assert "traget" in result.output


def test_the_router_file_holds_gates_and_average_activations_only(trained_package):
    with safe_open(str(trained_package / ROUTER_FILE), "pt") as router:
        suffixes = {key.rsplit(".", 1)[-1] for key in router.keys()}  # noqa: SIM118

    assert suffixes == {"gate", "average_activation"}


def test_train_with_dp_epsilon_writes_a_private_expert_that_passes_admission(
    tiny_base_dir, private_data, tmp_path
):
    out = tmp_path / "private"

    result = run_cli(
        "train",
        "--data",
        private_data,
        "--name",
        "otter",
        "--base",
        tiny_base_dir,
        "--out",
        out,
        *TINY_TRAINING,
        "--dp-epsilon",
        "4",
        "--dp-max-grad-norm",
        "0.5",
    )

    assert result.exit_code == 0, result.output
    expert = Expert.load(out)
    guarantee = expert.manifest.privacy
    assert guarantee is not None
    assert 3.9 <= guarantee.epsilon <= 4.0 and guarantee.delta == 1e-5
    assert (guarantee.max_grad_norm, guarantee.steps) == (0.5, 4 + 3)
    assert guarantee.sample_rate == 4 / 12  # every example trains: no validation split
    assert expert.manifest.training.examples == 12
    assert not expert.manifest.has_average_activation  # off by default under DP
    output = " ".join(result.output.split())
    assert "ε = " in output and "no loss published (DP)" in output
    inspected = run_cli("inspect", out)
    assert inspected.exit_code == 0 and "passes admission" in inspected.output


def test_train_refuses_dp_with_the_vectors_it_cannot_privatise_or_a_bad_budget(
    tiny_base_dir, private_data, tmp_path
):
    common = ["--data", private_data, "--name", "x", "--base", tiny_base_dir, *TINY_TRAINING]
    for extra, message in [
        (["--dp-epsilon", "8", "--average-activation"], "average activations cannot be shipped"),
        (["--dp-epsilon", "8", "--retrieval-embeddings"], "retrieval embeddings cannot be"),
        (["--dp-epsilon", "0"], "DifferentialPrivacy.epsilon must be in (0, 1e6]"),
        (["--dp-epsilon", "8", "--dp-delta", "0.5"], "not below 1/n"),
        (["--dp-delta", "1e-6"], "--dp-delta needs --dp-epsilon"),
    ]:
        out = tmp_path / "refused"
        result = run_cli("train", *common, "--out", out, *extra)

        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert not out.exists()
