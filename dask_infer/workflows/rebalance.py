"""Re-cut a running pipeline by its measured stage times.

The profile taken before the run says how cost is spread over the model's nodes; the
first chunks say how long each stage really takes on the workers. Scaling each node's
profiled time by its stage's measured/profiled ratio keeps the spread inside a stage
and corrects the totals between stages; the exact balancer then cuts again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dask_infer.partition.balance import balance_partition

__all__ = ["Rebalance", "imbalance", "recut_positions", "rebalanced_cuts"]


def imbalance(times: Sequence[float]) -> float:
    """Largest over mean of ``times`` (1.0 is perfect balance, and for empty or zero times)."""
    mean = sum(times) / len(times) if times else 0.0
    return max(times) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class Rebalance:
    """What a re-cut decided, for the log, the summary and the output's attrs."""

    threshold: float
    cuts_before: tuple[str, ...]
    measured_before: tuple[float, ...]
    cuts_after: tuple[str, ...]
    predicted_after: tuple[float, ...]
    chunks_measured: int = 0
    chunks_before: int = 0
    placement_before: dict[str, Any] | None = None
    placement_after: dict[str, Any] | None = None
    measured_after: tuple[float, ...] = ()

    @property
    def recut(self) -> bool:
        """Whether the cuts changed."""
        return self.cuts_after != self.cuts_before

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return {
            "threshold": self.threshold,
            "recut": self.recut,
            "chunks_measured": self.chunks_measured,
            "chunks_before": self.chunks_before,
            "before": {
                "cut_points": list(self.cuts_before),
                "stage_seconds_per_image": list(self.measured_before),
                "imbalance": imbalance(self.measured_before),
                "placement": self.placement_before,
            },
            "after": {
                "cut_points": list(self.cuts_after),
                "predicted_stage_seconds_per_image": list(self.predicted_after),
                "predicted_imbalance": imbalance(self.predicted_after),
                "stage_seconds_per_image": list(self.measured_after),
                "imbalance": imbalance(self.measured_after) if self.measured_after else None,
                "placement": self.placement_after,
            },
        }

    def describe(self) -> str:
        """Before and after, two lines."""

        def times(ts: Sequence[float]) -> str:
            return ", ".join(f"{t * 1e3:.2f}" for t in ts) + " ms/image"

        before = (
            f"stage times {times(self.measured_before)} (max/mean {imbalance(self.measured_before):.2f}) "
            f"with cuts {', '.join(self.cuts_before)}"
        )
        if not self.recut:
            return f"rebalance: {before}; kept (threshold {self.threshold:.2f})"
        return (
            f"rebalance: {before} exceeds {self.threshold:.2f}\n"
            f"  re-cut at {', '.join(self.cuts_after)}: predicted {times(self.predicted_after)} "
            f"(max/mean {imbalance(self.predicted_after):.2f})"
        )


def recut_positions(
    node_costs: Sequence[float],
    candidates: Sequence[int],
    cuts: Sequence[int],
    measured: Sequence[float],
) -> tuple[list[int], list[float]]:
    """New cut positions from profiled node costs rescaled by measured stage times.

    Parameters
    ----------
    node_costs
        Profiled cost of every node in execution order (node 0, the input, costs 0).
    candidates
        Positions a cut may follow, ascending.
    cuts
        The current cut positions (a subset of ``candidates``), one fewer than stages.
    measured
        Measured time of each current stage (any unit, e.g. seconds per image).

    Returns
    -------
    cuts, predicted
        The balanced cut positions and each new stage's predicted time (in the unit of
        ``measured``).
    """
    stages = len(cuts) + 1
    if len(measured) != stages:
        raise ValueError(f"{len(measured)} measured times for {stages} stages")
    edges = [0, *cuts, len(node_costs) - 1]
    scaled = list(node_costs)
    for k, (a, b) in enumerate(zip(edges, edges[1:], strict=False)):
        profiled = sum(node_costs[a + 1 : b + 1])
        for i in range(a + 1, b + 1):
            # A stage profiled at zero cost spreads its measured time evenly over its nodes.
            scaled[i] = node_costs[i] * measured[k] / profiled if profiled > 0 else measured[k] / (b - a)
    bounds = [0, *candidates, len(node_costs) - 1]
    segments = [sum(scaled[a + 1 : b + 1]) for a, b in zip(bounds, bounds[1:], strict=False)]
    starts = balance_partition(segments, stages)
    new = [candidates[s - 1] for s in starts]
    new_edges = [0, *new, len(node_costs) - 1]
    predicted = [sum(scaled[a + 1 : b + 1]) for a, b in zip(new_edges, new_edges[1:], strict=False)]
    return new, predicted


def rebalanced_cuts(
    module: Any,
    cut_points: Sequence[str],
    measured: Sequence[float],
    *,
    sample: tuple[int, ...],
    label: str,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Cut points of ``module`` balanced by ``measured`` stage times, and the predicted times.

    Profiles a copy of ``module`` node by node on a random batch of shape ``sample``,
    rescales the profile by the measured stage times, and cuts it again.
    """
    import torch

    from dask_infer.partition.profile import profile_graph
    from dask_infer.partition.split import ModelGraph

    work = copy.deepcopy(module).eval()
    graph = ModelGraph.trace(work, label)
    batch = torch.randn(sample, generator=torch.Generator().manual_seed(0))
    costs = profile_graph(graph, batch, repeats=3)
    candidates = [i for i in graph.candidates if costs[i].shape is not None]
    positions, predicted = recut_positions(
        [c.time_s for c in costs], candidates, graph.positions_of(list(cut_points)), measured
    )
    return tuple(graph.order[p].name for p in positions), tuple(predicted)
