"""The method works end to end on three tiny synthetic tasks (seeded, CPU).

Design (the mechanism each number checks):
- Base: `tiny_llama` (2 layers, hidden 64) with its tied embeddings scaled x5 (with the
  default 0.02 init the final RMSNorm caps every logit near 1, so no LoRA can make a
  confident prediction).
- Three tasks, each on its own 8-character alphabet (letters, digits, symbols), each with
  its own rule for continuing a walk round the alphabet's cycle: step +1, -1 and +3
  ("cdef" -> "ghab" for letters, "6543" -> "2107" for digits, ...).
- Shared geometry, task offset: character i of every alphabet gets the same embedding
  plus a per-task offset of the same norm. The experts' updates therefore carry over to
  the other alphabets and the rules conflict (the digits expert walks letters backwards),
  so averaging the experts (merged) mixes contradictory rules, while the offset tells the
  tasks' tokens apart, which is what a router can use.
- Free-text training targets: the loss sits on the task's own characters at every target
  position, so the LoRA helps at every own token, which is what a PHATGOOSE gate learns
  to open on.
- Multiple choice: the three rules' continuations from the same (correct) next character,
  so the choice is decided by predictions made at the task's own characters, not at the
  shared space before the continuation.
- LoRA on the MLP input projections (gate_proj, up_proj) only. Measured with LoRA on every
  linear (other task designs): the gates of attention/o_proj/down_proj modules often
  *close* on their own task (that module's update is not useful on its own) and then route
  away from their expert, and down_proj inputs are so small that its gate barely moves.
- Routing shares use top_k=1: with N=3 experts top-2 always gives weight to a wrong
  expert, so "mostly its own expert" is only meaningful for the top choice (accuracy is
  checked with k=1 and the default k=2).

Measured (this seed, 40 examples per task): own-expert top-1 share over every routed
token of the evaluation (prompt and choices, both adapted modules of both layers)
[0.92, 0.89, 0.96] (chance 1/3); with k=2 the own share of the two slots is
[0.48, 0.50, 0.49] (at most 0.5). Accuracy: base [0.47, 0.53, 0.15], merged
[0.72, 0.57, 0.75], PHATGOOSE k=2 [1, 1, 1], k=1 [1, 1, 1]; each expert alone scores 1.0
on its own task and 0.0-0.7 on the others. About 25 s on a loaded 2-core machine.
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
STEPS = {"letters": 1, "digits": -1, "symbols": 3}  # each task's walk round its cycle
TASKS = list(ALPHABETS)
# Gates get 40 steps (not the paper's tenth of the LoRA steps) at a higher rate: with 10
# steps from zero they barely leave sigmoid = 0.5 in a model this small.
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


def _run(task: str, start: int, n: int, step: int | None = None) -> str:
    step = STEPS[task] if step is None else step
    alphabet = ALPHABETS[task]
    return "".join(alphabet[(start + step * i) % K] for i in range(n))


def _training_set(task: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, m = rng.randrange(K), rng.randint(3, 6)
        target = _run(task, start + STEPS[task] * m, 4)
        out.append(Example(prompt=_run(task, start, m), target=target))
    return out


def _eval_set(task: str, n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    own = STEPS[task]
    out = []
    for _ in range(n):
        start, m = rng.randrange(K), rng.randint(3, 6)
        nxt = start + own * m
        # Every rule's continuation from the correct next character; the first is right.
        steps = [own] + [s for s in STEPS.values() if s != own]
        choices = [_run(task, nxt, 3, step=s) for s in steps]
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


def _shared_geometry_base(tokenizer):
    """The tiny base with embeddings x5; character i of every alphabet = a shared vector
    plus a per-task offset of the same norm (see the module docstring)."""
    model = tiny_llama(seed=0, hidden_size=64, layers=2)
    embeddings = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        embeddings.mul_(5.0)
        ids = {t: tokenizer.convert_tokens_to_ids(list(a)) for t, a in ALPHABETS.items()}
        shared = embeddings[ids["letters"]].clone()
        norm = shared.norm(dim=1).mean()
        for task in TASKS:
            offset = torch.randn(embeddings.shape[1], generator=generator)
            embeddings[ids[task]] = shared + offset / offset.norm() * norm
    return model


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tokenizer = tiny_tokenizer()
    model = _shared_geometry_base(tokenizer)
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
        assert own.accuracy >= 0.95, (task, own.accuracy)


def test_phatgoose_routes_each_task_mostly_to_its_own_expert(setup):
    # Every routed token of the evaluation (prompt and choices), every adapted module,
    # top-1 decisions. Chance is 1/3. Measured [0.92, 0.89, 0.96].
    _, shares = _scores(setup, "phatgoose", top_k=1)
    assert all(share > 0.75 for share in shares), shares


def test_phatgoose_scores_far_above_base_and_merged(setup):
    base, _ = _scores(setup, "base")  # measured [0.47, 0.53, 0.15]
    merged, _ = _scores(setup, "merged")  # measured [0.72, 0.57, 0.75]
    assert max(merged) <= 0.85, merged  # the conflicting rules do hurt when averaged
    for top_k in (1, 2):
        phatgoose, _ = _scores(setup, "phatgoose", top_k=top_k)  # measured [1, 1, 1]
        assert min(phatgoose) >= 0.9, (top_k, phatgoose)
        mean = sum(phatgoose) / 3
        assert mean >= sum(base) / 3 + 0.5, (top_k, phatgoose, base)
        assert mean >= sum(merged) / 3 + 0.25, (top_k, phatgoose, merged)
