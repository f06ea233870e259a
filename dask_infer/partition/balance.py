"""Exact contiguous min-max partition of a list of costs (no torch: pure Python).

Given costs ``c[0..m)`` and a number of parts ``k``, find cut indices
``0 < b[0] < ... < b[k-2] < m`` so that the largest part sum is as small as possible.
Sums are computed on exact integers (floats are scaled by a common power of two, which
every finite float allows), so the optimum is exact, not within a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from dask_infer.errors import DaskInferError
from dask_infer.options import check_positive_int

__all__ = [
    "SHARED_LEAD",
    "PartitionError",
    "balance_partition",
    "boundary_share",
    "cut_after",
    "imbalance",
    "part_sums",
    "shared_loads",
    "stage_sums",
]


class PartitionError(DaskInferError):
    """The costs or the number of parts cannot be partitioned."""


def _exact_integers(costs: Sequence[float]) -> list[int]:
    """``costs`` times one common power of two, as exact integers (same order, same ratios)."""
    ratios = [Fraction(c) for c in costs]
    scale = max((r.denominator for r in ratios), default=1)
    return [int(r * scale) for r in ratios]


def _check(costs: Sequence[float], parts: int, name: str = "costs") -> None:
    check_positive_int("parts", parts, error=PartitionError)
    if len(costs) < parts:
        raise PartitionError(
            f"parts={parts} but there are only {len(costs)} costs; use parts <= {len(costs)}"
        )
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 0:
            raise PartitionError(f"{name}[{i}]={c!r} must be a finite number >= 0")


def balance_partition(costs: Sequence[float], parts: int) -> tuple[int, ...]:
    """Split ``costs`` into ``parts`` contiguous non-empty runs minimising the largest run sum.

    Dynamic programme over prefixes: the best bottleneck of the first ``i`` costs in
    ``p`` runs, ``f[p][i] = min_j max(f[p-1][j], sum(costs[j:i]))``, where ``f[p-1][j]``
    grows and the last run's sum shrinks with ``j``, so the best ``j`` is found by
    bisection: ``O(parts * m * log m)``.

    Among all optimal partitions the one with the lexicographically smallest cut
    indices is returned, so the result is deterministic.

    Parameters
    ----------
    costs
        Non-negative finite costs, one per item, in order.
    parts
        Number of runs, ``1 <= parts <= len(costs)``.

    Returns
    -------
    tuple of int
        The ``parts - 1`` indices where runs 2, 3, ... start: run ``r`` is
        ``costs[cuts[r-1]:cuts[r]]`` with ``cuts[-1] = 0`` and ``cuts[parts-1] = len(costs)``.

    Raises
    ------
    PartitionError
        If ``parts`` is not in ``1..len(costs)`` or a cost is negative or not finite.

    Examples
    --------
    >>> balance_partition([1, 2, 3, 4, 5], 2)
    (3,)
    >>> balance_partition([5, 1, 1, 1, 5], 3)
    (1, 4)
    """
    _check(costs, parts)
    values = _exact_integers(costs)
    prefix = [0]
    for v in values:
        prefix.append(prefix[-1] + v)
    best = _bottleneck(prefix, parts)
    return _earliest_cuts(prefix, parts, best)


def _bottleneck(prefix: list[int], parts: int) -> int:
    """Smallest possible largest run sum of the costs behind ``prefix`` in ``parts`` runs."""
    m = len(prefix) - 1
    previous = prefix[:]  # f[1][i] = prefix[i]
    for p in range(2, parts + 1):
        current = [0] * (m + 1)
        for i in range(p, m + 1):
            # j ranges over [p-1, i-1]; find the first j with previous[j] >= last-run sum.
            lo, hi = p - 1, i - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if previous[mid] >= prefix[i] - prefix[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            value = max(previous[lo], prefix[i] - prefix[lo])
            if lo > p - 1:
                value = min(value, max(previous[lo - 1], prefix[i] - prefix[lo - 1]))
            current[i] = value
        previous = current
    return previous[m]


def _earliest_cuts(prefix: list[int], parts: int, bound: int) -> tuple[int, ...]:
    """Lexicographically smallest cuts into ``parts`` runs whose sums are all ``<= bound``."""
    m = len(prefix) - 1
    # need[s]: fewest runs of sum <= bound covering items s..m-1 (greedy is optimal).
    need = [0] * (m + 1)
    reach = m
    for s in range(m - 1, -1, -1):
        while prefix[reach] - prefix[s] > bound:
            reach -= 1
        need[s] = 1 + need[reach]
    cuts: list[int] = []
    start = 0
    for left in range(parts - 1, 0, -1):
        # Earliest end of this run that leaves a suffix splittable into `left` runs.
        end = start + 1
        while need[end] > left:
            end += 1
        cuts.append(end)
        start = end
    return tuple(cuts)


def part_sums(costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """Sum of each run of ``costs`` cut at ``cuts`` (as returned by :func:`balance_partition`)."""
    edges = [0, *cuts, len(costs)]
    return [sum(costs[a:b]) for a, b in zip(edges, edges[1:], strict=False)]


def imbalance(costs: Sequence[float]) -> float:
    """Largest over mean of ``costs``: 1.0 is perfect balance (also for empty or all-zero costs)."""
    mean = sum(costs) / len(costs) if costs else 0.0
    return max(costs) / mean if mean > 0 else 1.0


SHARED_LEAD = 0.04
"""How much less per chunk the first of two workers sharing a boundary stage is given: it
runs ahead, so the second always has a chunk waiting. Placement routes by it, and a plan's
imbalance counts with it."""


def boundary_share(before: float, shared: float, after: float, lead: float = 0.0) -> float:
    """Share of the chunks for which the worker before a shared boundary stage also runs it.

    The worker before takes ``before + f * shared`` per chunk and the worker after
    ``after + (1 - f) * shared``. ``f`` makes the first take ``1 - lead`` times what the
    second takes (``lead`` 0: the same), within 0 and 1.

    Examples
    --------
    >>> boundary_share(4.0, 2.0, 5.0)
    0.75
    """
    if shared <= 0:
        return 0.5
    f = ((1 - lead) * (after + shared) - before) / ((2 - lead) * shared)
    return min(1.0, max(0.0, f))


def shared_loads(costs: Sequence[float], shared: int, lead: float = 0.0) -> tuple[float, float]:
    """What each of the two workers takes per chunk when stage ``shared`` of ``costs`` is shared."""
    before, middle, after = sum(costs[:shared]), costs[shared], sum(costs[shared + 1 :])
    f = boundary_share(before, middle, after, lead)
    return before + f * middle, after + (1 - f) * middle


def stage_sums(node_costs: Sequence[float], cuts: Sequence[int]) -> list[float]:
    """Cost of each stage when a graph of ``node_costs`` is cut after the nodes at ``cuts``.

    Node 0 is the graph's input and costs nothing; stage ``k`` holds the nodes after
    cut ``k - 1`` up to and including cut ``k`` (the last stage ends at the last node).
    """
    edges = [0, *cuts, len(node_costs) - 1]
    return [sum(node_costs[a + 1 : b + 1]) for a, b in zip(edges, edges[1:], strict=False)]


def cut_after(
    node_costs: Sequence[float],
    candidates: Sequence[int],
    parts: int,
    cut_costs: Sequence[float] | None = None,
) -> list[int]:
    """The candidate nodes to cut after so that ``parts`` stages have the smallest largest cost.

    Parameters
    ----------
    node_costs
        Cost of every graph node in execution order; node 0 (the input) costs nothing.
    candidates
        Ascending positions a cut may follow.
    parts
        Number of stages, ``1 <= parts <= len(candidates) + 1``.
    cut_costs
        What cutting after each candidate costs each of the two stages beside the cut
        (moving the activation out of one and into the other), in the units of
        ``node_costs``; ``None`` or all zero: cuts are free.

    Returns
    -------
    list of int
        ``parts - 1`` positions, a subset of ``candidates``.

    Examples
    --------
    >>> cut_after([0, 1, 1, 1, 3], [1, 2, 3], 2)
    [3]
    """
    if parts == 1:
        return []
    segments = stage_sums(node_costs, candidates)
    if cut_costs is not None and any(cut_costs):
        if len(cut_costs) != len(candidates):
            raise PartitionError(
                f"cut_costs has {len(cut_costs)} values for {len(candidates)} candidates; "
                "give one per candidate"
            )
        _check(list(cut_costs), 1, "cut_costs")
        return [candidates[s - 1] for s in _min_max_with_cut_costs(segments, list(cut_costs), parts)]
    # Stage r starts at segment starts[r-1], so its cut follows the candidate ending the segment before.
    return [candidates[s - 1] for s in balance_partition(segments, parts)]


def _min_max_with_cut_costs(segments: Sequence[float], cut_costs: list[float], parts: int) -> tuple[int, ...]:
    """Split ``segments`` into ``parts`` runs minimising the largest run cost, where a run also
    pays the cost of each cut at its ends (``cut_costs[j - 1]`` for a cut before segment ``j``).

    Dynamic programme over prefixes, ``O(parts * m**2)``. Among optimal splits it keeps
    the one whose earlier runs have the smallest largest cost, so the result is deterministic.
    """
    m = len(segments)
    _check(segments, parts)
    prefix = [0.0]
    for v in segments:
        prefix.append(prefix[-1] + v)

    def cut(j: int) -> float:  # a cut before segment j, 0 < j < m
        return cut_costs[j - 1]

    inf = math.inf
    # best[p][i]: smallest largest cost of segments[:i] in p runs, the last run paying the cut at i.
    best = [[inf] * (m + 1) for _ in range(parts)]
    back = [[0] * (m + 1) for _ in range(parts)]
    for i in range(1, m):
        best[1][i] = prefix[i] + cut(i)
    for p in range(2, parts):
        for i in range(p, m):
            for j in range(p - 1, i):
                value = max(best[p - 1][j], prefix[i] - prefix[j] + cut(j) + cut(i))
                if value < best[p][i]:
                    best[p][i], back[p][i] = value, j
    final, last = inf, parts - 1
    for j in range(parts - 1, m):
        value = max(best[parts - 1][j], prefix[m] - prefix[j] + cut(j))
        if value < final:
            final, last = value, j
    cuts = [last]
    for p in range(parts - 1, 1, -1):
        cuts.append(back[p][cuts[-1]])
    return tuple(reversed(cuts))
