"""TIES and DARE (phatgoose/routing/merging.py) against direct loop implementations."""

import copy
import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from phatgoose.routing import build_routed_model, routing_state
from phatgoose.routing.merging import (
    Reiterable,
    dare_drop,
    dare_generator,
    dare_merge,
    dare_seed,
    dare_update,
    dense_factors,
    disjoint_mean,
    elect_signs,
    ties_merge,
    ties_update,
    trim,
)
from tests.phatgoose.experts import random_expert
from tests.phatgoose.test_routing_model import batch_for, logits

RANKS = (2, 4, 4, 8, 3)
# Adapts one attention and one MLP linear per block (llama's and T5's names): elsewhere it
# is a zero update.
PARTIAL_TARGETS = ["q_proj", "up_proj", "q", "wi"]


# ------------------------------------------------------------------ the reference, in loops
def as_lists(matrix):
    return [[float(x) for x in row] for row in matrix.tolist()]


def ref_trim(matrix, density):
    rows, cols = len(matrix), len(matrix[0])
    keep = max(1, min(rows * cols, math.floor(density * rows * cols + 0.5)))
    # Largest magnitude first; equal magnitudes: the lower row-major index first.
    order = sorted(range(rows * cols), key=lambda i: (-abs(matrix[i // cols][i % cols]), i))
    kept = set(order[:keep])
    return [
        [matrix[i][j] if i * cols + j in kept else 0.0 for j in range(cols)] for i in range(rows)
    ]


def ref_signs(matrices):
    rows, cols = len(matrices[0]), len(matrices[0][0])
    signs = []
    for i in range(rows):
        row = []
        for j in range(cols):
            total = 0.0
            for m in matrices:
                total += m[i][j]
            row.append(1.0 if total > 0 else -1.0 if total < 0 else 0.0)
        signs.append(row)
    return signs


def ref_disjoint_mean(matrices, signs):
    rows, cols = len(signs), len(signs[0])
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            total, count = 0.0, 0
            for m in matrices:
                x = m[i][j]
                if x != 0 and (x > 0) == (signs[i][j] > 0) and signs[i][j] != 0:
                    total += x
                    count += 1
            row.append(total / count if count else 0.0)
        out.append(row)
    return out


def ref_ties(matrices, density, scale):
    trimmed = [ref_trim(m, density) for m in matrices]
    mean = ref_disjoint_mean(trimmed, ref_signs(trimmed))
    return [[scale * x for x in row] for row in mean]


def ref_seed(seed, path, position):
    return int.from_bytes(
        hashlib.sha256(f"{seed}/{path}/{position}".encode()).digest()[:8], "little"
    )


def ref_drop(matrix, drop_rate, seed):
    # The documented draw: float64 torch.rand in the update's shape from a CPU generator.
    draw = torch.rand(
        len(matrix),
        len(matrix[0]),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed),
    ).tolist()
    return [
        [x / (1 - drop_rate) if draw[i][j] >= drop_rate else 0.0 for j, x in enumerate(row)]
        for i, row in enumerate(matrix)
    ]


def ref_dare(matrices, seeds, drop_rate, merge, scale, count=None):
    dropped = [ref_drop(m, drop_rate, s) for m, s in zip(matrices, seeds, strict=True)]
    if merge == "ties":
        merged = ref_disjoint_mean(dropped, ref_signs(dropped))
    else:
        count = count or len(dropped)
        merged = [
            [sum(m[i][j] for m in dropped) / count for j in range(len(dropped[0][0]))]
            for i in range(len(dropped[0]))
        ]
    return [[scale * x for x in row] for row in merged]


def tensor(lists):
    return torch.tensor(lists, dtype=torch.float64)


def random_updates(count=4, shape=(6, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(count)]


def module_reference(experts, path, method, params):
    """The merged dense update at `path`, by the loops, over the whole release (an expert
    not adapting `path` is a zero update)."""
    members = [z for z, e in enumerate(experts) if path in e.module_paths()]
    dense = []
    for z in members:
        a, b, s = experts[z].lora_update(path)
        dense.append(as_lists(s * (b.double() @ a.double())))
    if method == "ties":
        return tensor(ref_ties(dense, params["density"], params["scale"]))
    seeds = [ref_seed(params["seed"], path, z) for z in members]
    return tensor(
        ref_dare(
            dense,
            seeds,
            params["drop_rate"],
            params["merge"],
            params["scale"],
            count=len(experts),
        )
    )


# ------------------------------------------------------------------ TIES, pure
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9, 1.0])
def test_trim_keeps_the_top_density_entries_by_magnitude(density):
    for update in random_updates():
        expected = tensor(ref_trim(as_lists(update), density))
        assert torch.equal(trim(update, density), expected)


def test_trim_breaks_ties_at_the_threshold_by_the_lowest_flat_index():
    update = tensor([[1.0, -2.0, 2.0], [2.0, -1.0, -2.0]])
    # Three of six kept; four entries share the magnitude 2: flat indices 1, 2, 3 win.
    assert torch.equal(trim(update, 0.5), tensor([[0.0, -2.0, 2.0], [2.0, 0.0, 0.0]]))


def test_trim_rounds_the_kept_count_half_up_and_keeps_at_least_one():
    update = torch.arange(1.0, 11.0, dtype=torch.float64).reshape(2, 5)  # 10 entries
    assert int((trim(update, 0.25) != 0).sum()) == 3  # 2.5 -> 3
    assert int((trim(update, 0.24) != 0).sum()) == 2
    assert torch.equal(trim(update, 0.01), tensor([[0.0] * 5, [0.0] * 4 + [10.0]]))


def test_signs_are_elected_by_total_mass_not_by_count():
    updates = [tensor([[1.0, 1.0, 0.0]]), tensor([[1.0, -1.0, 0.0]]), tensor([[-5.0, 1.0, 0.0]])]
    assert torch.equal(elect_signs(updates), tensor([[-1.0, 1.0, 0.0]]))
    assert torch.equal(elect_signs(updates), tensor(ref_signs([as_lists(u) for u in updates])))


def test_disjoint_mean_averages_only_the_nonzero_entries_agreeing_with_the_sign():
    updates = [tensor([[2.0, 0.0, 1.0, 0.0]]), tensor([[4.0, 3.0, -1.0, 0.0]])]
    signs = tensor([[1.0, 1.0, 0.0, 1.0]])
    # Entry 1: only the non-zero 3 counts; entry 2: sum 0, nobody agrees; entry 3: nobody kept.
    assert torch.equal(disjoint_mean(updates, signs), tensor([[3.0, 3.0, 0.0, 0.0]]))
    for seed in range(3):
        updates = [trim(u, 0.4) for u in random_updates(seed=seed)]
        signs = elect_signs(updates)
        expected = ref_disjoint_mean([as_lists(u) for u in updates], as_lists(signs))
        assert torch.equal(disjoint_mean(updates, signs), tensor(expected))


@pytest.mark.parametrize(("density", "scale"), [(0.2, 1.0), (0.5, 0.7), (1.0, 2.5)])
def test_ties_merge_equals_the_loop_reference_entry_by_entry(density, scale):
    updates = random_updates(count=5)
    expected = tensor(ref_ties([as_lists(u) for u in updates], density, scale))
    torch.testing.assert_close(ties_merge(updates, density, scale), expected, rtol=0, atol=1e-14)


def test_an_entry_no_expert_keeps_stays_zero():
    updates = [tensor([[9.0, 0.1], [0.2, 0.3]]), tensor([[8.0, 0.2], [0.1, 0.3]])]
    assert torch.equal(ties_merge(updates, 0.25, 1.0), tensor([[8.5, 0.0], [0.0, 0.0]]))


def test_ties_at_density_one_with_agreeing_signs_is_the_plain_mean():
    updates = [u.abs() for u in random_updates(count=5)]
    mean = sum(updates) / len(updates)
    torch.testing.assert_close(ties_merge(updates, 1.0, 1.0), mean, rtol=0, atol=1e-14)
    negative = [-u for u in updates]
    torch.testing.assert_close(ties_merge(negative, 1.0, 3.0), -3 * mean, rtol=0, atol=1e-14)


def test_ties_reads_a_reiterable_like_a_list():
    updates = random_updates()
    lazy = Reiterable(lambda: (u.clone() for u in updates))
    assert torch.equal(ties_merge(lazy, 0.3, 1.0), ties_merge(updates, 0.3, 1.0))


# ------------------------------------------------------------------ DARE, pure
@pytest.mark.parametrize("drop_rate", [0.0, 0.3, 0.9])
def test_dare_drop_keeps_where_the_draw_reaches_p_and_rescales_by_one_minus_p(drop_rate):
    update = random_updates(count=1, shape=(7, 9))[0]
    seed = dare_seed(0, "model.layers.0.self_attn.q_proj", 3)
    dropped = dare_drop(update, drop_rate, dare_generator(seed))
    assert torch.equal(dropped, tensor(ref_drop(as_lists(update), drop_rate, seed)))
    kept = dropped != 0
    assert torch.equal(dropped[kept], update[kept] / (1 - drop_rate))


def test_dare_with_drop_rate_zero_keeps_the_update_exactly():
    update = random_updates(count=1)[0]
    assert torch.equal(dare_drop(update, 0.0, dare_generator(5)), update)


def test_dare_drops_about_a_fraction_p_of_the_entries():
    update = torch.ones(200, 200, dtype=torch.float64)
    for drop_rate in (0.1, 0.5, 0.9):
        dropped = dare_drop(update, drop_rate, dare_generator(dare_seed(0, "x", 0)))
        assert abs(float((dropped == 0).double().mean()) - drop_rate) < 0.01


def test_dare_seed_is_sha256_of_seed_path_and_position():
    seed = dare_seed(0, "model.layers.0.mlp.up_proj", 2)
    # Pinned: a release must give the same model with every later library version.
    assert seed == ref_seed(0, "model.layers.0.mlp.up_proj", 2) == 16442785034483082203
    seeds = {
        dare_seed(seed, path, position)
        for seed in (0, 1)
        for path in ("a.q", "a.k")
        for position in (0, 1)
    }
    assert len(seeds) == 8  # each of seed, path and position changes the draw


def test_dare_masks_are_the_same_in_another_process():
    code = (
        "import torch\n"
        "from phatgoose.routing.merging import dare_drop, dare_generator, dare_seed\n"
        "s = dare_seed(7, 'encoder.block.0.layer.0.SelfAttention.q', 4)\n"
        "u = torch.ones(16, 16, dtype=torch.float64)\n"
        "mask = dare_drop(u, 0.5, dare_generator(s)) != 0\n"
        "print(s, ''.join('1' if m else '0' for m in mask.reshape(-1).tolist()))\n"
    )
    seed = dare_seed(7, "encoder.block.0.layer.0.SelfAttention.q", 4)
    mask = dare_drop(torch.ones(16, 16, dtype=torch.float64), 0.5, dare_generator(seed)) != 0
    here = f"{seed} {''.join('1' if m else '0' for m in mask.reshape(-1).tolist())}"
    # This process's hash() is randomised (unless PYTHONHASHSEED is set): fix another one.
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "1"},
    ).stdout.strip()
    assert there == here


@pytest.mark.parametrize(("merge", "count"), [("average", None), ("average", 6), ("ties", None)])
def test_dare_merge_equals_the_loop_reference_entry_by_entry(merge, count):
    updates = random_updates(count=4)
    seeds = [dare_seed(3, "m", z) for z in range(4)]
    merged = dare_merge(updates, seeds, drop_rate=0.6, merge=merge, scale=1.3, count=count)
    expected = ref_dare([as_lists(u) for u in updates], seeds, 0.6, merge, 1.3, count)
    torch.testing.assert_close(merged, tensor(expected), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ per module, over experts
def make_experts(model, ranks=RANKS, partial=True):
    experts = [random_expert(model, name=f"e{z}", rank=r, seed=10 + z) for z, r in enumerate(ranks)]
    if partial:
        experts.append(
            random_expert(model, name="partial", rank=3, seed=99, target_modules=PARTIAL_TARGETS)
        )
    return experts


def test_dense_factors_multiply_back_to_the_update_on_the_narrower_side():
    for shape in [(6, 4), (4, 6), (5, 5)]:
        delta = torch.randn(*shape, dtype=torch.float64)
        lora_A, lora_B = dense_factors(delta)
        assert lora_A.dtype == lora_B.dtype == torch.float32
        assert lora_A.shape[0] == min(shape)
        torch.testing.assert_close(lora_B @ lora_A, delta.float(), rtol=0, atol=0)


def test_dare_update_is_deterministic_and_depends_on_the_seed_and_the_path(llama):
    experts = make_experts(llama)
    path = "model.layers.0.self_attn.q_proj"
    params = {"drop_rate": 0.5, "merge": "average", "scale": 1.0}
    first = dare_update(experts, path, seed=0, **params)
    again = dare_update(experts, path, seed=0, **params)
    other_seed = dare_update(experts, path, seed=1, **params)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[1], other_seed[1])
    # The same update dropped at another path draws another mask.
    a, b, s = experts[0].lora_update(path)
    update = s * (b.double() @ a.double())
    masks = [
        dare_drop(update, 0.5, dare_generator(dare_seed(0, p, 0))) != 0
        for p in (path, "model.layers.1.self_attn.q_proj")
    ]
    assert not torch.equal(*masks)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": 0.3, "scale": 1.5}),
        ("dare", {"drop_rate": 0.5, "merge": "average", "scale": 1.2, "seed": 3}),
        ("dare", {"drop_rate": 0.7, "merge": "ties", "scale": 1.0, "seed": 0}),
    ],
)
def test_merge_equals_the_base_with_the_merged_update_added_to_its_weights(
    tiny_model, method, params
):
    # In float64: unlike merged's average, these updates are not shrunk by 1/N, and float32
    # rounding alone moves T5's logits by up to 2.5e-5; what is left in float64 is the
    # rounding of the stored float32 factors (about 1e-7 of an entry).
    tiny_model.double()
    experts, batch = make_experts(tiny_model), batch_for(tiny_model)
    by_hand = copy.deepcopy(tiny_model)
    modules = dict(by_hand.named_modules())
    paths = list(dict.fromkeys(p for e in experts for p in e.module_paths()))
    with torch.no_grad():
        for path in paths:
            modules[path].weight += module_reference(experts, path, method, params)
    routed = build_routed_model(tiny_model, experts, method, params=params)
    assert routing_state(routed).params == params
    torch.testing.assert_close(logits(routed, batch), logits(by_hand, batch), atol=1e-5, rtol=0)


def test_ties_update_is_the_loop_reference_at_a_module_some_experts_skip(llama):
    experts = make_experts(llama)
    path = "model.layers.1.self_attn.k_proj"  # the partial expert does not adapt it
    assert path not in experts[-1].module_paths()
    lora_A, lora_B = ties_update(experts, path, density=0.2, scale=1.0)
    expected = module_reference(experts, path, "ties", {"density": 0.2, "scale": 1.0})
    torch.testing.assert_close(lora_B @ lora_A, expected.float(), rtol=0, atol=1e-6)


def test_dare_without_drops_and_with_the_average_equals_the_merged_method(tiny_model):
    experts, batch = make_experts(tiny_model, ranks=(4, 4, 4), partial=False), batch_for(tiny_model)
    merged = logits(build_routed_model(copy.deepcopy(tiny_model), experts, "merged"), batch)
    params = {"drop_rate": 0.0, "merge": "average"}
    dare = logits(build_routed_model(tiny_model, experts, "dare", params=params), batch)
    torch.testing.assert_close(dare, merged, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 0.0}, r"method 'ties': parameter 'density' must be a number > 0"),
        ("ties", {"density": 1.5}, r"parameter 'density' must be .* <= 1"),
        ("ties", {"scale": -1.0}, r"parameter 'scale' must be a number > 0"),
        ("dare", {"drop_rate": 1.0}, r"parameter 'drop_rate' must be a number >= 0 and < 1"),
        ("dare", {"merge": "sum"}, r"parameter 'merge' must be one of 'average', 'ties'"),
        ("dare", {"seed": 1.5}, r"parameter 'seed' must be an integer"),
        ("ties", {"drop_rate": 0.5}, r"method 'ties' has no parameter\(s\) 'drop_rate'"),
    ],
)
def test_bad_params_are_refused_naming_the_parameter(llama, method, params, message):
    with pytest.raises(ValueError, match=message):
        build_routed_model(
            llama, make_experts(llama, ranks=(2, 2), partial=False), method, params=params
        )
    assert routing_state(llama) is None


def test_the_pure_functions_refuse_bad_values():
    updates = random_updates()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ties_merge(updates, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\)"):
        dare_drop(updates[0], 1.0, dare_generator(0))
    with pytest.raises(ValueError, match="merge must be one of"):
        dare_merge(updates, [0, 1, 2, 3], drop_rate=0.5, merge="sum", scale=1.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        ties_merge(updates, 0.5, float("nan"))
    with pytest.raises(ValueError, match="must share one shape"):
        ties_merge([updates[0], torch.zeros(2, 2, dtype=torch.float64)], 0.5, 1.0)
    with pytest.raises(ValueError, match="at least one update"):
        ties_merge([], 0.5, 1.0)
    with pytest.raises(TypeError, match="reads the updates twice"):
        ties_merge(iter(updates), 0.5, 1.0)
    with pytest.raises(ValueError):  # one seed per update, never silently fewer
        dare_merge(updates, [0, 1], drop_rate=0.5, merge="average", scale=1.0)
