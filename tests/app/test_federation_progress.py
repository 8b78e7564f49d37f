"""A node's training progress (stage, step, loss) read from what its loops write to its log."""

import contextlib
import functools
import io

import tqdm.auto

from app.federation import TrainingProgress, training_progress
from phatgoose.data import Example
from phatgoose.training import TrainingConfig, lora, train_expert, train_gates

EXAMPLES = [Example(prompt=f"{c} ->", target=c.upper()) for c in "abcdefghijkl"]
CONFIG = TrainingConfig(
    r=2, lora_alpha=4.0, steps=4, gate_steps=3, batch_size=4, max_length=16, eval_every=2
)


def test_the_progress_is_the_last_bar_the_training_loops_drew(monkeypatch, llama, tokenizer):
    # A bar redraws at most every 0.1 s; tiny steps take less, so draw every step.
    monkeypatch.setattr(lora, "tqdm", functools.partial(tqdm.auto.tqdm, mininterval=0))
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        expert = train_expert(llama, tokenizer, EXAMPLES, name="colors", config=CONFIG)
        after_lora = training_progress(log.getvalue())
        train_gates(llama, tokenizer, expert, EXAMPLES, config=CONFIG)
        after_gates = training_progress(log.getvalue())

    assert after_lora is not None and after_gates is not None
    assert (after_lora.stage, after_lora.step, after_lora.steps) == ("LoRA", 4, 4)
    assert after_lora.loss is not None and after_lora.loss > 0
    # The latest evaluation's loss (4 decimals), at or above the best one kept.
    best = expert.manifest.training.best_validation_loss
    assert after_lora.validation_loss is not None and best is not None
    assert after_lora.validation_loss >= round(best, 4) - 1e-4
    assert (after_gates.stage, after_gates.step, after_gates.steps) == ("gates", 3, 3)
    assert after_gates.loss is not None and after_gates.validation_loss is None


def test_a_node_log_with_flower_lines_and_other_bars():
    text = (
        "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n"
        "Loading weights: 100%|██████████| 272/272 [00:00<00:00, 8441.12it/s]\n"
        "\rLoRA navigate:   0%|          | 0/6 [00:00<?, ?it/s]"
        "\rLoRA navigate:  33%|███▎      | 2/6 [00:24<00:45, 11.27s/it, loss=5.2351, "
        "val=5.5233, best=5.5233@1]"
        "\r                                                          \r\n"
        "\x1b[92mINFO \x1b[0m:      Sent successfully\n"
    )

    assert training_progress(text) == TrainingProgress("LoRA", 2, 6, 5.2351, 5.5233)


def test_no_progress_before_the_training_loops_start():
    text = "Loading weights: 100%|██████████| 272/272 [00:00<00:00, 8441.12it/s]\nready\n"

    assert training_progress(text) is None
    assert training_progress("") is None
