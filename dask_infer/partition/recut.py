"""Cut points balanced again by measured stage times (pure, apart from profiling the model).

The profile taken before the run says how cost is spread over the model's nodes; the
first chunks say how long each stage really takes on the workers. Scaling each node's
profiled time by its stage's measured/profiled ratio keeps the spread inside a stage
and corrects the totals between stages; the exact balancer then cuts again.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from dask_infer.partition.balance import cut_after, stage_sums
from dask_infer.partition.profile import profile_graph
from dask_infer.partition.split import ModelGraph

__all__ = ["rebalanced_cuts", "recut_positions"]


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
    new = cut_after(scaled, candidates, stages)
    return new, stage_sums(scaled, new)


def rebalanced_cuts(
    module: nn.Module,
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
    work = copy.deepcopy(module).eval()
    graph = ModelGraph.trace(work, label)
    batch = torch.randn(sample, generator=torch.Generator().manual_seed(0))
    costs = profile_graph(graph, batch, repeats=3)
    candidates = [i for i in graph.candidates if costs[i].shape is not None]
    positions, predicted = recut_positions(
        [c.time_s for c in costs], candidates, graph.positions_of(list(cut_points)), measured
    )
    return tuple(graph.order[p].name for p in positions), tuple(predicted)
