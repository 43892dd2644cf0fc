import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from squeezekv import SqueezeConfig
from squeezekv.allocators import allocate, conserve, plan_budgets
from squeezekv.allocators.squeeze import kmeans_1d


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


def test_squeeze_gives_the_high_similarity_group_p_times_b_and_keeps_the_total():
    similarity = torch.tensor([0.40, 0.42, 0.95, 0.96, 0.97, 0.70, 0.72, 0.94])
    config = SqueezeConfig(budget=100, allocator="squeeze", p=0.3)
    budgets = allocate(similarity, 100, floor=1, caps=torch.full((8,), 1000), config=config)
    squeezed = [2, 3, 4, 7]
    assert budgets[squeezed].tolist() == [30] * 4
    assert budgets[[0, 1, 5, 6]].tolist() == [170] * 4
    assert int(budgets.sum()) == 800


def test_squeeze_redistributes_what_a_capped_layer_cannot_hold():
    similarity = torch.tensor([0.1, 0.5, 0.9, 0.9])
    config = SqueezeConfig(budget=10, allocator="squeeze", p=0.5)
    caps = torch.tensor([12, 40, 40, 40])
    budgets = allocate(similarity, 10, floor=1, caps=caps, config=config)
    assert budgets.tolist() == [12, 18, 5, 5]
    assert int(budgets.sum()) == 40


def test_allocation_never_exceeds_what_layers_can_hold():
    config = SqueezeConfig(budget=50, allocator="squeeze")
    budgets = allocate(
        torch.tensor([0.1, 0.2, 0.9]), 50, floor=1, caps=torch.tensor([20, 20, 20]), config=config
    )
    assert budgets.tolist() == [20, 20, 20]


def test_floor_applies_to_the_squeezed_group():
    config = SqueezeConfig(budget=10, policy="streaming", allocator="squeeze", p=0.1, sinks=4)
    budgets = allocate(
        torch.tensor([0.1, 0.2, 0.9, 0.95]), 10, floor=5, caps=torch.full((4,), 100), config=config
    )
    assert budgets.min() >= 5 and int(budgets.sum()) == 40


def test_identical_similarities_fall_back_to_uniform():
    config = SqueezeConfig(budget=10, allocator="squeeze")
    budgets = allocate(torch.full((6,), 0.5), 10, floor=1, caps=torch.full((6,), 100), config=config)
    assert budgets.tolist() == [10] * 6


def test_pyramid_decreases_with_depth_at_the_same_total():
    config = SqueezeConfig(budget=40, allocator="pyramid")
    budgets = allocate(torch.rand(8), 40, floor=1, caps=torch.full((8,), 1000), config=config)
    assert int(budgets.sum()) == 320
    assert all(a >= b for a, b in itertools.pairwise(budgets.tolist()))
    assert budgets[0] > budgets[-1]


def test_uniform_gives_every_layer_b():
    config = SqueezeConfig(budget=0.25, allocator="uniform")
    budgets = plan_budgets(torch.rand(2, 5), torch.tensor([40, 80]), config, [None] * 5)
    assert budgets.tolist() == [[10] * 5, [20] * 5]


def test_sliding_layers_are_capped_at_their_window():
    config = SqueezeConfig(budget=1.0, allocator="uniform")
    budgets = plan_budgets(torch.rand(1, 3), torch.tensor([100]), config, [None, 16, None], max_new_tokens=5)
    assert budgets.tolist() == [[105, 15, 105]]  # the window's overflow goes to the others, up to their cap
