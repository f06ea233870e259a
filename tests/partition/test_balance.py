"""Exact contiguous min-max partition, checked on literals and against brute force."""

from __future__ import annotations

import itertools
import random

import pytest

from dask_infer.errors import DaskInferError
from dask_infer.partition.balance import PartitionError, balance_partition, cut_after, part_sums, stage_sums


def brute_force(costs: list[float], parts: int) -> tuple[int, ...]:
    """Lexicographically smallest cuts among those with the smallest largest part."""
    best: tuple[float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, len(costs)), parts - 1):
        worst = max(part_sums(costs, cuts))
        if best is None or worst < best[0]:
            best = (worst, cuts)
    assert best is not None
    return best[1]


@pytest.mark.parametrize(
    ("costs", "parts", "cuts"),
    [
        ([1, 2, 3, 4, 5], 2, (3,)),
        ([5, 1, 1, 1, 5], 3, (1, 4)),
        ([3, 3, 3], 3, (1, 2)),
        ([7], 1, ()),
        ([1, 2, 3], 1, ()),
        ([0, 0, 0, 1], 2, (1,)),
        ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, (1,)),
        ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10], 2, (10,)),
        ([2, 2, 2, 2, 2, 2], 3, (2, 4)),
        ([0.1, 0.2, 0.3], 2, (2,)),
        ([1, 4, 1, 4, 1, 4], 3, (2, 4)),
    ],
)
def test_literal_partitions(costs: list[float], parts: int, cuts: tuple[int, ...]) -> None:
    assert balance_partition(costs, parts) == cuts


def test_part_sums() -> None:
    assert part_sums([1, 2, 3, 4], (1, 3)) == [1, 5, 4]
    assert part_sums([1, 2], ()) == [3]


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_random_integers(seed: int) -> None:
    rng = random.Random(seed)
    costs = [rng.randint(0, 9) for _ in range(rng.randint(1, 9))]
    parts = rng.randint(1, len(costs))
    assert balance_partition(costs, parts) == brute_force(costs, parts)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_floats(seed: int) -> None:
    # Multiples of 1/8 add without rounding, so brute force sums are exact too.
    rng = random.Random(1000 + seed)
    costs = [rng.randint(0, 80) / 8 for _ in range(rng.randint(2, 9))]
    parts = rng.randint(1, len(costs))
    assert balance_partition(costs, parts) == brute_force(costs, parts)


def test_large_input_is_fast_and_valid() -> None:
    rng = random.Random(7)
    costs = [rng.random() for _ in range(2000)]
    cuts = balance_partition(costs, 16)
    assert len(cuts) == 15 and list(cuts) == sorted(set(cuts)) and cuts[0] > 0 and cuts[-1] < 2000
    # The bottleneck cannot beat the largest single cost nor the mean part.
    worst = max(part_sums(costs, cuts))
    assert worst >= max(max(costs), sum(costs) / 16) - 1e-12


@pytest.mark.parametrize(
    ("costs", "parts", "match"),
    [
        ([1, 2], 0, "parts=0 must be a whole number >= 1"),
        ([1, 2], 3, "parts=3 but there are only 2 costs; use parts <= 2"),
        ([1, 2], True, "parts=True"),
        ([1, 2], 1.5, "parts=1.5"),
        ([1, -2], 1, r"costs\[1\]=-2 must be a finite number >= 0"),
        ([1, float("nan")], 1, r"costs\[1\]=nan"),
        ([1, float("inf")], 1, r"costs\[1\]=inf"),
        (["1"], 1, r"costs\[0\]='1'"),
        ([], 1, "only 0 costs"),
    ],
)
def test_bad_input(costs: list, parts: object, match: str) -> None:
    with pytest.raises(PartitionError, match=match) as info:
        balance_partition(costs, parts)  # type: ignore[arg-type]
    assert isinstance(info.value, DaskInferError)


def _brute_with_cut_costs(
    node_costs: list[float], candidates: list[int], parts: int, cut_costs: list[float]
) -> float:
    """The smallest largest stage cost over every choice of cuts, each stage paying its cuts."""
    best = float("inf")
    for chosen in itertools.combinations(range(len(candidates)), parts - 1):
        cuts = [candidates[i] for i in chosen]
        sums = stage_sums(node_costs, cuts)
        for k, i in enumerate(chosen):
            sums[k] += cut_costs[i]
            sums[k + 1] += cut_costs[i]
        best = min(best, max(sums))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_cut_costs_give_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    node_costs = [0.0] + [rng.uniform(0, 5) for _ in range(n)]
    candidates = sorted(rng.sample(range(1, n), rng.randint(1, n - 1)))
    parts = rng.randint(2, len(candidates) + 1)
    cut_costs = [rng.uniform(0, 3) for _ in candidates]
    cuts = cut_after(node_costs, candidates, parts, cut_costs)
    assert len(cuts) == parts - 1 and set(cuts) <= set(candidates) and cuts == sorted(cuts)
    sums = stage_sums(node_costs, cuts)
    for k, c in enumerate(cuts):
        sums[k] += cut_costs[candidates.index(c)]
        sums[k + 1] += cut_costs[candidates.index(c)]
    assert max(sums) == pytest.approx(_brute_with_cut_costs(node_costs, candidates, parts, cut_costs))


def test_a_costly_cut_moves_to_a_cheaper_neighbour() -> None:
    # Free cuts split [1, 1, 1, 3] after node 3; a cut there costing 5 goes after node 2.
    assert cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2) == [3]
    assert cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2, [0.1, 0.1, 5.0]) == [2]
    assert cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2, [0.0, 0.0, 0.0]) == [3]
    with pytest.raises(PartitionError, match="cut_costs has 2 values for 3 candidates"):
        cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2, [1.0, 1.0])
    with pytest.raises(PartitionError, match=r"cut_costs\[1\]=-1.0 must be a finite number >= 0"):
        cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2, [1.0, -1.0, 1.0])
