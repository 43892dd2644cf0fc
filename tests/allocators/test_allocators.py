import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezekv import SqueezeConfig
from squeezekv.allocators import Pyramid, Squeeze, conserve
from squeezekv.allocators import base as allocators_base
from squeezekv.allocators.blend import Blend
from squeezekv.allocators.squeeze import kmeans_1d
from squeezekv.allocators.squeeze_lowest import SqueezeLowest
from squeezekv.allocators.squeeze_random import SqueezeRandom


def brute_force_kmeans_cost(values: list[float], groups: int) -> float:
    """Best within-cluster squared error over every split of the sorted values into groups."""
    xs = sorted(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(xs)), groups - 1):
        bounds = (0, *cuts, len(xs))
        cost = 0.0
        for a, b in itertools.pairwise(bounds):
            part = xs[a:b]
            mean = sum(part) / len(part)
            cost += sum((x - mean) ** 2 for x in part)
        best = min(best, cost)
    return best


def labels_cost(values: list[float], labels: list[int]) -> float:
    cost = 0.0
    for label in set(labels):
        part = [v for v, lab in zip(values, labels, strict=True) if lab == label]
        mean = sum(part) / len(part)
        cost += sum((x - mean) ** 2 for x in part)
    return cost


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=9), st.integers(2, 3))
def test_kmeans_is_optimal_and_ordered_by_centroid(values, groups):
    labels = kmeans_1d(values, groups)
    if len(set(values)) >= groups:
        assert labels_cost(values, labels) == pytest.approx(brute_force_kmeans_cost(values, groups), abs=1e-9)
    centroids = {}
    for label in set(labels):
        part = [v for v, lab in zip(values, labels, strict=True) if lab == label]
        centroids[label] = sum(part) / len(part)
    assert [centroids[label] for label in sorted(centroids)] == sorted(centroids.values())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 50.0), min_size=2, max_size=12),
    st.integers(0, 3),
    st.integers(1, 40),
    st.data(),
)
def test_conserve_keeps_bounds_and_total(targets, floor, ceiling, data):
    layers = len(targets)
    hi = torch.tensor(
        data.draw(st.lists(st.integers(floor, floor + ceiling), min_size=layers, max_size=layers))
    )
    lo = torch.full((layers,), float(floor)).minimum(hi.double())
    total = data.draw(st.integers(0, int(hi.sum()) + 20))
    result = conserve(torch.tensor(targets, dtype=torch.float64), total, lo, hi.double())
    assert (result >= lo).all() and (result <= hi).all()
    assert int(result.sum()) == max(int(lo.sum()), min(total, int(hi.sum())))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 9000.0), min_size=1, max_size=40),
    st.integers(0, 4),
    st.sampled_from([None, 50, 3000]),
    st.floats(0.0, 1.3),
)
def test_conserve_from_its_bracket_equals_conserve_over_every_shift(targets, floor, cap, share):
    """The bracket around the crossing of the piecewise-linear fill only saves sums: bisecting from
    it ends on the shift, and so the budgets, that bisecting every shift ends on."""
    targets = torch.tensor(targets, dtype=torch.float64)
    lo = torch.full_like(targets, float(floor))
    hi = torch.full_like(targets, 8192.0)
    if cap is not None:  # layers that cannot hold their share
        hi = torch.linspace(floor, cap, len(targets), dtype=torch.float64)
    total = share * float(targets.sum())
    bracketed = conserve(targets, total, lo, hi)
    real_bracket = allocators_base.shift_bracket

    def whole_range(targets, lo, hi, total):
        return float((lo - targets).min()), float((hi - targets).max())

    allocators_base.shift_bracket = whole_range
    try:
        assert torch.equal(bracketed, conserve(targets, total, lo, hi))
    finally:
        allocators_base.shift_bracket = real_bracket


def test_squeeze_gives_the_high_similarity_group_p_times_b_and_keeps_the_total():
    similarity = torch.tensor([0.40, 0.42, 0.95, 0.96, 0.97, 0.70, 0.72, 0.94])
    budgets = Squeeze(p=0.3).allocate(similarity, 100, floor=1, caps=torch.full((8,), 1000))
    squeezed = [2, 3, 4, 7]
    assert budgets[squeezed].tolist() == [30] * 4
    assert budgets[[0, 1, 5, 6]].tolist() == [170] * 4
    assert int(budgets.sum()) == 800


def test_squeeze_redistributes_what_a_capped_layer_cannot_hold():
    similarity = torch.tensor([0.1, 0.5, 0.9, 0.9])
    caps = torch.tensor([12, 40, 40, 40])
    budgets = Squeeze(p=0.5).allocate(similarity, 10, floor=1, caps=caps)
    assert budgets.tolist() == [12, 18, 5, 5]
    assert int(budgets.sum()) == 40


def test_allocation_never_exceeds_what_layers_can_hold():
    budgets = Squeeze().allocate(torch.tensor([0.1, 0.2, 0.9]), 50, floor=1, caps=torch.tensor([20, 20, 20]))
    assert budgets.tolist() == [20, 20, 20]


def test_floor_applies_to_the_squeezed_group():
    budgets = Squeeze(p=0.1).allocate(
        torch.tensor([0.1, 0.2, 0.9, 0.95]), 10, floor=5, caps=torch.full((4,), 100)
    )
    assert budgets.min() >= 5 and int(budgets.sum()) == 40


def test_identical_similarities_fall_back_to_uniform():
    budgets = Squeeze().allocate(torch.full((6,), 0.5), 10, floor=1, caps=torch.full((6,), 100))
    assert budgets.tolist() == [10] * 6


def test_pyramid_decreases_with_depth_at_the_same_total():
    budgets = Pyramid().allocate(torch.rand(8), 40, floor=1, caps=torch.full((8,), 1000))
    assert int(budgets.sum()) == 320
    assert all(a >= b for a, b in itertools.pairwise(budgets.tolist()))
    assert budgets[0] > budgets[-1]


def test_uniform_gives_every_layer_b():
    config = SqueezeConfig(budget=0.25, allocator="uniform")
    budgets = config.plan_budgets(torch.rand(2, 5), torch.tensor([40, 80]), [None] * 5)
    assert budgets.tolist() == [[10] * 5, [20] * 5]


def test_sliding_layers_are_capped_at_their_window():
    config = SqueezeConfig(budget=100, allocator="uniform")
    budgets = config.plan_budgets(torch.rand(1, 3), torch.tensor([100]), [None, 16, None], max_new_tokens=5)
    assert budgets.tolist() == [[105, 15, 105]]  # the window's overflow goes to the others, up to their cap


def test_a_keep_everything_budget_gives_every_layer_its_cap_whatever_the_allocator():
    for allocator in ("uniform", "squeeze", "pyramid", "cake"):  # cake needs no dispersion to keep all
        config = SqueezeConfig(budget=1.0, allocator=allocator)
        budgets = config.plan_budgets(
            torch.rand(2, 3), torch.tensor([100, 40]), [None, 16, None], max_new_tokens=5
        )
        assert budgets.tolist() == [[105, 15, 105], [45, 15, 45]]


def test_squeeze_clusters_fewer_layers_than_groups_into_as_many_groups():
    budgets = Squeeze(p=0.5, groups=3).allocate(
        torch.tensor([0.2, 0.9]), 10, floor=1, caps=torch.full((2,), 100)
    )
    assert budgets.tolist() == [15, 5]  # two layers, two groups: the more similar one is squeezed
    single = Squeeze(groups=3).allocate(torch.tensor([0.7]), 10, floor=1, caps=torch.full((1,), 100))
    assert single.tolist() == [10]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Squeeze(p="x"), r"allocator 'squeeze': p='x' must be a number"),
        (lambda: Squeeze(p=0.0), r"p=0.0 must be in \(0, 1\]"),
        (lambda: Squeeze(groups=2.5), r"groups=2.5 must be an integer"),
        (lambda: Squeeze(groups=1), r"groups=1 must be an integer >= 2"),
        (lambda: Pyramid(beta=1), r"allocator 'pyramid': beta=1.0 must be > 1"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# a SmolLM2-like profile: three layers stand out, the rest are alike
PROFILE = torch.tensor([0.61, 0.85] + [0.98, 0.97] * 11 + [0.89] + [0.97] * 5, dtype=torch.float64)
CAPS = torch.full((30,), 4096.0)


def test_controls_squeeze_as_many_layers_as_squeeze_but_others():
    squeezed = Squeeze().squeezed_layers(PROFILE)
    lowest = SqueezeLowest().squeezed_layers(PROFILE)
    assert int(lowest.sum()) == int(squeezed.sum()) == 27
    assert set(torch.argsort(PROFILE, stable=True)[:27].tolist()) == set(lowest.nonzero().flatten().tolist())
    drawn = [SqueezeRandom(seed=seed).squeezed_layers(PROFILE) for seed in (0, 0, 1)]
    assert all(int(d.sum()) == 27 for d in drawn) and torch.equal(drawn[0], drawn[1])
    assert not torch.equal(drawn[0], drawn[2])
    for allocator in (Squeeze(), SqueezeLowest(), SqueezeRandom()):  # same budget rule, same total
        budgets = allocator.allocate(PROFILE, 800, floor=1, caps=CAPS)
        assert (
            int(budgets.sum()) == 30 * 800
            and sorted(budgets.tolist())[:27]
            == sorted(Squeeze().allocate(PROFILE, 800, floor=1, caps=CAPS).tolist())[:27]
        )


def test_blend_moves_a_bounded_share_by_contribution():
    budgets = Blend(share=0.3).allocate(PROFILE, 800, floor=1, caps=CAPS)
    assert int(budgets.sum()) == 30 * 800
    assert int(budgets.min()) >= 0.7 * 800 and int(budgets.argmax()) == 0  # the lowest similarity
    assert torch.equal(Blend(share=0.0).allocate(PROFILE, 800, floor=1, caps=CAPS), torch.full((30,), 800))
    with pytest.raises(ValueError, match=r"share=1.5 must be in \[0, 1\]"):
        Blend(share=1.5)
