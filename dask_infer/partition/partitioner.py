"""Partition a model into balanced sequential stages: trace, profile, balance, cut, verify."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dask_infer.errors import ModelError, reason
from dask_infer.models.registry import build_model
from dask_infer.options import check_positive_int
from dask_infer.partition.balance import cut_after
from dask_infer.partition.profile import NodeCost, profile_graph, torch_threads
from dask_infer.partition.profile_memo import Measured, profile_key, recall, remember
from dask_infer.partition.split import ModelGraph, run_stages, split_model
from dask_infer.partition.stage_plan import PlanError, StageInfo, StagePlan, check_balance

__all__ = ["DEFAULT_SAMPLE_SHAPE", "Partition", "build_stage", "partition_model"]

DEFAULT_SAMPLE_SHAPE = (1, 3, 224, 224)


class Partition(NamedTuple):
    """Result of :func:`partition_model`: the stage modules and their plan."""

    modules: list[nn.Module]
    plan: StagePlan


def _make_sample(sample: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    if sample is None:
        sample = DEFAULT_SAMPLE_SHAPE
    if isinstance(sample, torch.Tensor):
        tensor = sample.detach()
    else:
        shape = tuple(sample)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
            raise ModelError(f"sample shape {shape} must be positive integers, e.g. {DEFAULT_SAMPLE_SHAPE}")
        generator = torch.Generator().manual_seed(0)
        tensor = torch.randn(shape, generator=generator)
    if tensor.ndim != 4:
        hint = "; add a batch dimension" if tensor.ndim == 3 else ""
        raise ModelError(
            f"sample of shape {tuple(tensor.shape)} must be a batch shaped (N, C, H, W), "
            f"e.g. {DEFAULT_SAMPLE_SHAPE}{hint}"
        )
    return tensor


def _reference_output(model: nn.Module, sample: torch.Tensor, label: str) -> Any:
    try:
        with torch.no_grad():
            return model(sample.clone())
    except Exception as exc:
        raise ModelError(
            f"sample of shape {tuple(sample.shape)} does not fit {label} ({reason(exc)}); "
            f"give a float batch shaped (N, 3, H, W) at the model's input size, e.g. {DEFAULT_SAMPLE_SHAPE}"
        ) from exc


def _bitwise_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        as_bytes = [t.reshape(-1).contiguous().view(torch.uint8) for t in (a, b)]
        return torch.equal(*as_bytes)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_bitwise_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def _cut_candidates(graph: ModelGraph, costs: list[NodeCost], fused: bool) -> list[int]:
    """Positions the model may be cut after; when ``fused``, none before a pointwise node that
    reads the node and may be cut after itself (the cut moves past it)."""
    found = [i for i in graph.candidates if costs[i].shape is not None]
    if not fused:
        return found
    allowed = set(found)
    order = graph.order
    return [
        i
        for i in found
        if not (i + 1 in allowed and costs[i + 1].pointwise and order[i] in order[i + 1].all_input_nodes)
    ]


def _shared_boundary(
    node_costs: list[float], candidates: list[int], cut: int, threshold: float
) -> tuple[list[int], int | None]:
    """The cuts around the balance of a two-stage ``cut``, and the shared stage between them.

    One cut (and no shared stage) where it leaves the stages within ``threshold`` of each
    other, or where no cut point lies on the other side of the balance.
    """
    total = sum(node_costs)
    before = sum(node_costs[: cut + 1])
    if total <= 0 or max(before, total - before) / (total / 2) <= threshold:
        return [cut], None
    at = candidates.index(cut)
    other = at + 1 if before < total / 2 else at - 1
    if not 0 <= other < len(candidates):
        return [cut], None
    return sorted([cut, candidates[other]]), 1


def _node_cost(cost: NodeCost, balance: str) -> float:
    return float(
        {"time": cost.time_s, "flops": cost.flops, "params": cost.params, "memory": cost.memory_bytes}[
            balance
        ]
    )


def _stage_info(
    index: int, stage: nn.Module, graph: ModelGraph, costs: list[NodeCost], bounds: tuple[int, int]
) -> StageInfo:
    start, end = bounds
    own = costs[start + 1 : end + 1]
    weights = [*stage.parameters(), *stage.buffers()]
    return StageInfo(
        index=index,
        first_node=graph.order[start + 1].name,
        last_node=graph.order[end].name,
        num_nodes=end - start,
        params=sum(p.numel() for p in stage.parameters()),
        flops=sum(c.flops for c in own),
        time_s=sum(c.time_s for c in own),
        weight_bytes=sum(t.nelement() * t.element_size() for t in weights),
        activation_bytes=sum(c.activation_bytes for c in own),
    )


def partition_model(
    model: nn.Module,
    stages: int,
    *,
    balance: str = "time",
    sample: torch.Tensor | Sequence[int] | None = None,
    name: str | None = None,
    repeats: int = 5,
    verify: bool = True,
    threads: int | None = None,
    strip_tail: bool = False,
    transfer_s_per_byte: float = 0.0,
    fused: bool = False,
    share_boundary: float | None = None,
    reuse_profile: bool = False,
) -> Partition:
    """Cut ``model`` into ``stages`` sequential sub-models of balanced cost.

    The model is traced with torch.fx (in eval mode, on a deep copy: ``model`` is never
    modified) and may only be cut where exactly one tensor crosses, so residual, dense
    and attention blocks stay whole. Each node is profiled on ``sample``; the cuts then
    minimise the largest stage cost exactly (see :func:`balance_partition`).

    Parameters
    ----------
    model
        Any torch.fx-traceable single-input model, e.g. a torchvision classifier; it
        need not be an ``nn.Sequential``.
    stages
        Number of stages, from 1 to the number of cut points plus one.
    balance
        Cost to balance: ``"time"`` (measured wall time), ``"flops"``, ``"params"`` or
        ``"memory"`` (weights plus activations created).
    sample
        Input batch to profile on, or its shape; default ``(1, 3, 224, 224)`` of
        seeded random values.
    name
        Registry name of the model, recorded in the plan so workers can rebuild stages
        with :func:`build_stage`.
    repeats
        Timed runs per node (each node keeps its fastest); more gives steadier ``"time"`` plans.
    verify
        Check that the stages run one after another reproduce the model's output on
        ``sample`` bit for bit.
    threads
        Torch intra-op threads to profile with: those each stage will run with (a
        one-thread pipeline worker, say). Layers use threads unequally, so stage times
        measured with other threads can cut the stages unevenly. ``None`` keeps the
        process's setting.
    transfer_s_per_byte
        With ``balance="time"``: seconds each of the two stages beside a cut spends per byte
        of the activation crossing it (sending it, and receiving it), so that of two cuts
        about as balanced, the one moving less data wins. 0 (default): cuts are free.
    strip_tail
        Cut a dense model that ends by resizing its map to the input's size without that
        resize (see :func:`~dask_infer.partition.split.resize_tail`); the check applies it.
    fused
        With ``balance="time"``: balance the stages as compiled code runs them
        (``torch.compile``, with inductor freezing on a CPU). Pointwise nodes (batch norm
        in eval, activations, residual adds) cost nothing, since they fuse into the
        operation before them, and no cut falls between such a node and its producer:
        compiled apart, the producer loses the fused epilogue. Measured for ResNet-50 bf16
        on one CPU thread: eager times put 51.7% of the model before ``layer2_3``'s end
        and compiled stages ran 46.6-46.9% there (fused times: 46.5%); cut at
        ``layer2_3_add`` rather than after its ReLU, the two compiled stages took 7-10%
        longer than the whole model.
    share_boundary
        With ``stages=2`` and ``balance="time"``: where the best single cut leaves the two
        stages further apart than this (largest over mean, e.g. 1.03), cut at both cut
        points around the balance instead, so the part between them is a third stage
        that both workers hold and share chunk by chunk (``StagePlan.shared_stage``).
        A residual block is one unit: ResNet-50's best compiled cut leaves 53.1% of the
        work on one stage. ``None`` (default): one cut.
    reuse_profile
        Take the node costs from an earlier call in this process that profiled the same
        traced model (tensor shapes and dtypes) on a sample of the same shape, dtype and
        layout with the same ``threads`` and ``repeats``, and skip the check of cuts that
        call already checked (see :mod:`dask_infer.partition.profile_memo`). A pipeline's
        stage worker profiles with it, so a second run on the same worker measures
        nothing. ``False`` (default): measure.

    Returns
    -------
    Partition
        ``(modules, plan)``: the stage modules (``torch.fx.GraphModule`` in eval mode,
        sharing one copy of the weights) and their :class:`StagePlan`.

    Raises
    ------
    ModelError
        For a bad ``stages`` or ``sample``, a model that cannot be traced, too few cut
        points, or stages that do not reproduce the model's output.
    PlanError
        For an unknown ``balance`` mode.
    """
    check_positive_int("stages", stages, error=ModelError)
    check_balance(balance)
    check_positive_int("repeats", repeats, error=ModelError)
    check_positive_int("threads", threads, optional=True, error=ModelError)
    if share_boundary is not None and not (
        isinstance(share_boundary, int | float) and math.isfinite(share_boundary) and share_boundary >= 1
    ):
        raise ModelError(
            f"share_boundary={share_boundary!r} must be a stage imbalance >= 1 (e.g. 1.03), or None"
        )
    label = name or type(model).__name__
    batch = _make_sample(sample)
    work = copy.deepcopy(model).eval()
    graph = ModelGraph.trace(work, label, strip_tail=strip_tail)
    key = profile_key(graph, batch, threads, repeats) if reuse_profile else None
    kept: Measured | None = recall(key) if key is not None else None
    expected = _reference_output(work, batch, label) if kept is None else None
    if kept is None:
        with torch_threads(threads):
            costs = profile_graph(graph, batch, repeats=repeats)
    else:
        costs = list(kept.costs)
    measured = costs
    fused = fused and balance == "time"
    if fused:
        costs = [replace(c, time_s=0.0) if c.pointwise else c for c in costs]
    candidates = _cut_candidates(graph, costs, fused)
    if stages > len(candidates) + 1:
        why = " (it has no point where a single tensor crosses)" if not candidates else ""
        raise ModelError(
            f"stages={stages} but {label} has only {len(candidates)} cut points{why}; "
            f"use stages <= {len(candidates) + 1}"
        )
    if not (math.isfinite(transfer_s_per_byte) and transfer_s_per_byte >= 0):
        raise ModelError(f"transfer_s_per_byte={transfer_s_per_byte!r} must be a finite number >= 0")
    moving = [costs[i].nbytes * transfer_s_per_byte for i in candidates] if balance == "time" else None
    node_costs = [_node_cost(c, balance) for c in costs]
    cuts = cut_after(node_costs, candidates, stages, moving)
    shared = None
    if share_boundary is not None and stages == 2 and balance == "time":
        cuts, shared = _shared_boundary(node_costs, candidates, cuts[0], share_boundary)
    modules = graph.build_stages(cuts)
    checked = kept.verified if kept is not None else frozenset()
    if verify and tuple(cuts) not in checked:
        if expected is None:
            expected = _reference_output(work, batch, label)
        with torch.no_grad():
            got = run_stages(modules, batch.clone(), graph.tail)
        if not _bitwise_equal(got, expected):
            raise ModelError(
                f"the {stages} stages of {label} do not reproduce its output bit for bit; "
                "its forward likely has Python control flow that torch.fx fixed at trace time, "
                "so it cannot be split"
            )
        checked = checked | {tuple(cuts)}
    if kept is not None:
        output_shape = kept.output_shape
    else:
        output_shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else ()
    if key is not None:
        remember(key, Measured(tuple(measured), output_shape, checked))
    bounds = graph.stage_bounds(cuts)
    infos = tuple(
        _stage_info(i, m, graph, costs, b) for i, (m, b) in enumerate(zip(modules, bounds, strict=True))
    )
    plan = StagePlan(
        model=name,
        balance=balance,
        input_shape=tuple(batch.shape),
        cut_points=tuple(graph.order[c].name for c in cuts),
        stages=infos,
        cut_shapes=tuple(costs[c].shape or () for c in cuts),
        cut_bytes=tuple(costs[c].nbytes for c in cuts),
        output_shape=output_shape,
        num_candidates=len(candidates),
        threads=threads,
        fused=fused,
        shared_stage=shared,
    )
    return Partition(list(modules), plan)


def build_stage(
    plan: StagePlan,
    index: int,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Rebuild stage ``index`` of ``plan`` from the model name and a local weights file.

    This is what a worker runs: no pickled model travels, only the plan.

    Parameters
    ----------
    plan
        A plan whose ``model`` names a registry model.
    index
        Which stage, from 0.
    weights, num_classes
        As for :func:`~dask_infer.models.build_model`.

    Raises
    ------
    PlanError
        If the plan has no model name or ``index`` is out of range.
    """
    if plan.model is None:
        raise PlanError("the plan has no model name; pass name= to partition_model, or use split_model")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < plan.num_stages:
        raise PlanError(
            f"stage index {index!r} is out of range; the plan has stages 0..{plan.num_stages - 1}"
        )
    loaded = build_model(plan.model, weights=weights, num_classes=num_classes)
    return split_model(loaded.module, plan.cut_points, copy_model=False)[index]
