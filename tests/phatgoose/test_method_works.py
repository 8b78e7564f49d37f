"""The method works end to end on three tiny synthetic tasks (seeded, CPU).

Design (the mechanism each number checks):
- Base: `tiny_llama` (2 layers, hidden 64) with its tied embeddings scaled x5. With the
  default 0.02 init the final RMSNorm caps every logit near 1, so no LoRA can make a
  confident prediction; scaled up, the residual stream is dominated by the current token,
  which gives the base a strong prior: "the next character repeats this one".
- Three tasks, each on its own 8-character alphabet (letters, digits, symbols), same rule:
  continue the alphabet's cycle ("cdef" -> "ghab"). Free-text training targets, so the
  loss sits on the task's own characters at every target position and the LoRA helps at
  every own token: that is what a PHATGOOSE gate learns to open on.
- Multiple choice: the true continuation against "repeat" (the base's favourite) and
  "go backwards". The three choices share their first character, so the choice is decided
  by predictions made at the task's own characters (not at the shared space before it).
- LoRA on the MLP input projections (gate_proj, up_proj) only. Measured with LoRA on every
  linear: the gates of attention/o_proj/down_proj modules often *close* on their own task
  (the update there is not useful on its own) and then route away from their expert, and
  down_proj inputs are so small that its gate barely moves; with the MLP inputs the gates
  open on their own tokens (sigmoid > 0.85 at layer 0) and routing follows the alphabet.
- Routing is measured with top_k=1: with N=3 experts top-2 always gives weight to a wrong
  expert, so "mostly its own expert" is only meaningful for the top choice.

Measured (this seed): own-expert top-1 share over all routed tokens [0.65, 0.74, 0.72]
(chance 1/3); with k=2, own share of the two slots [0.40, 0.46, 0.44] (at most 0.5).
Accuracy (40 examples per task): base [0, 0, 0], merged [0.825, 1, 1], PHATGOOSE k=2
[1, 1, 1], k=1 [0.85, 1, 1]. About 25 s on a loaded 2-core machine.

Known gap (strict xfail below): merging does NOT fail here. The final RMSNorm makes logits
depend on the direction of the hidden state, so a third of each expert's update still wins
its own task; and experts on disjoint alphabets do not conflict. Tasks that conflict on
shared tokens (a constant shared answer, positional copy rules) either leave the experts
unable to learn in a tiny random model or put the decision at shared tokens, where gates
trained on one task's data have no reason to discriminate.
"""

from __future__ import annotations

import random

import pytest
import torch

from phatgoose.data import Example
from phatgoose.evaluation import evaluate_task
from phatgoose.routing import build_routed_model, capture_routing, unroute_model
from phatgoose.training import TrainingConfig, train_expert, train_gates
from tests.tiny import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.slow

K = 8
ALPHABETS = {"letters": "abcdefgh", "digits": "01234567", "symbols": "!#$%&*+="}
TASKS = list(ALPHABETS)
CONFIG = TrainingConfig(
    r=4,
    lora_alpha=8,
    target_modules=["gate_proj", "up_proj"],
    learning_rate=3e-2,
    steps=100,
    batch_size=8,
    max_length=64,
    validation_fraction=0.1,
    gate_steps=40,
    gate_learning_rate=0.1,
    seed=0,
)


def _run(task: str, start: int, n: int) -> str:
    alphabet = ALPHABETS[task]
    return "".join(alphabet[(start + i) % K] for i in range(n))


def _training_set(task: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, m = rng.randrange(K), rng.randint(3, 6)
        out.append(Example(prompt=_run(task, start, m), target=_run(task, start + m, 4)))
    return out


def _eval_set(task: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    alphabet = ALPHABETS[task]
    out = []
    for _ in range(n):
        start, m = rng.randrange(K), rng.randint(3, 6)
        nxt = start + m
        choices = [
            _run(task, nxt, 3),  # the cycle goes on (correct)
            alphabet[nxt % K] * 3,  # repeat: what the base prefers
            "".join(alphabet[(nxt - i) % K] for i in range(3)),  # backwards
        ]
        order = list(range(3))
        rng.shuffle(order)
        out.append(
            Example(
                prompt=_run(task, start, m),
                choices=tuple(choices[o] for o in order),
                answer=order.index(0),
            )
        )
    return out


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = tiny_llama(seed=0, hidden_size=64, layers=2)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    experts, evals = [], {}
    for i, task in enumerate(TASKS):
        examples = _training_set(task, 100, seed=i)
        evals[task] = _eval_set(task, 40, seed=100 + i)
        expert = train_expert(model, tokenizer, examples, name=task, config=CONFIG, progress=False)
        expert = train_gates(model, tokenizer, expert, examples, config=CONFIG, progress=False)
        experts.append(expert)
    return model, tokenizer, experts, evals


def _scores(setup, method: str, top_k: int = 2) -> tuple[list[float], list[float]]:
    """(accuracy per task, own-expert share of routing decisions per task)."""
    model, tokenizer, experts, evals = setup
    build_routed_model(model, experts, method, top_k=top_k)
    try:
        accuracies, shares = [], []
        for i, task in enumerate(TASKS):
            with capture_routing(model) as stats:
                result = evaluate_task(model, tokenizer, evals[task], task=task, progress=False)
            accuracies.append(result.accuracy)
            if stats.counts:
                total = sum(stats.counts.values())
                shares.append(float(total[i]) / float(total.sum()))
        return accuracies, shares
    finally:
        unroute_model(model)


def test_each_expert_learned_its_own_task(setup):
    model, tokenizer, experts, evals = setup
    for i, task in enumerate(TASKS):
        build_routed_model(model, experts, "single", expert=experts[i].name)
        try:
            own = evaluate_task(model, tokenizer, evals[task], task=task, progress=False)
        finally:
            unroute_model(model)
        assert own.accuracy >= 0.9, (task, own.accuracy)


def test_phatgoose_routes_each_task_mostly_to_its_own_expert(setup):
    # Every routed token of the evaluation (prompt and choices), every adapted module,
    # top-1 decisions. Chance is 1/3. Measured [0.65, 0.74, 0.72].
    _, shares = _scores(setup, "phatgoose", top_k=1)
    assert all(share > 0.55 for share in shares), shares


def test_phatgoose_scores_far_above_the_base(setup):
    base, _ = _scores(setup, "base")
    for top_k in (1, 2):
        phatgoose, _ = _scores(setup, "phatgoose", top_k=top_k)
        assert min(phatgoose) >= 0.75, (top_k, phatgoose)
        assert sum(phatgoose) / 3 >= sum(base) / 3 + 0.6, (top_k, phatgoose, base)


def test_phatgoose_at_least_matches_merged(setup):
    merged, _ = _scores(setup, "merged")
    phatgoose, _ = _scores(setup, "phatgoose", top_k=2)
    assert sum(phatgoose) / 3 >= sum(merged) / 3 - 0.02, (phatgoose, merged)


@pytest.mark.xfail(
    strict=True,
    reason="merged experts also solve these disjoint-alphabet tasks (see module docstring); "
    "a design where merging fails and gates still route is still open",
)
def test_phatgoose_scores_far_above_merged(setup):
    merged, _ = _scores(setup, "merged")
    phatgoose, _ = _scores(setup, "phatgoose", top_k=2)
    assert sum(phatgoose) / 3 >= sum(merged) / 3 + 0.3, (phatgoose, merged)
