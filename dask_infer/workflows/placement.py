"""Placement: which workers run which stages (data-parallel, pipeline, hybrid, auto).

A placement is decided once, before any work is submitted, from what the scheduler
reports about its workers and what the stage plan says each stage costs. It is plain
data: the graph turns it into worker restrictions, the runtime reads which stages its
own worker holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes

from dask_infer.errors import DaskInferError
from dask_infer.options import PLACEMENTS
from dask_infer.partition.balance import SHARED_LEAD, boundary_share, imbalance
from dask_infer.partition.stage_plan import StagePlan

__all__ = [
    "DEVICE_RESOURCE",
    "Placement",
    "PlacementError",
    "WorkerInfo",
    "check_memory",
    "choose_placement",
    "on_workers",
    "share_boundary",
    "stage_memory",
    "with_plan",
    "workers_from_scheduler",
]

DEVICE_RESOURCE = "GPU"
"""Worker resource that marks a worker as holding one device; CPU test clusters set it as a stand-in."""


class PlacementError(DaskInferError):
    """The stages cannot be placed on the cluster's workers."""


@dataclass(frozen=True)
class WorkerInfo:
    """What placement needs to know about one worker.

    Attributes
    ----------
    address
        The worker's address, as the scheduler knows it.
    memory_bytes
        Memory the stages may use there: the GPU's memory when the worker has one, else
        the worker's ``memory_limit``; 0 when unknown (not checked).
    memory_kind
        ``"GPU memory"`` or ``"memory_limit"``, for messages.
    device
        Whether the worker holds a device: a ``GPU`` resource, or a CUDA device it reported.
    """

    address: str
    memory_bytes: int
    memory_kind: str = "memory_limit"
    device: bool = False


@dataclass(frozen=True)
class Placement:
    """Which workers run each stage.

    Attributes
    ----------
    mode
        ``"data"``, ``"pipeline"`` or ``"hybrid"`` (``"auto"`` resolves to one of them).
    groups
        ``groups[r][k]``: the workers that run stage ``k`` of replica ``r``. Data-parallel
        has one replica whose every stage is on every worker.
    reason
        Why this placement: the numbers it was chosen and checked by.
    shared
        ``(stage, share)`` where a stage is held by the workers of the stages beside it:
        the first runs it for ``share`` of the chunks, spread evenly, the second for the
        rest (see :func:`share_boundary`); ``None`` otherwise.
    """

    mode: str
    groups: tuple[tuple[tuple[str, ...], ...], ...]
    reason: str
    shared: tuple[int, float] | None = None

    def route(self, stage: int, chunk: int, replica: int = 0) -> tuple[str, ...]:
        """The workers that may run ``stage`` of chunk ``chunk``: one of a shared stage's two, or
        the stage's whole group.

        Chunk ``i`` runs a shared stage on the first worker when ``floor((i + 1) * share)``
        exceeds ``floor(i * share)``, which spreads those chunks evenly.
        """
        group = self.groups[replica][stage]
        if self.shared is None or self.shared[0] != stage or len(group) != 2:
            return group
        share = self.shared[1]
        first = math.floor((chunk + 1) * share + 1e-9) > math.floor(chunk * share + 1e-9)
        return (group[0],) if first else (group[1],)

    @property
    def num_stages(self) -> int:
        """Stages per replica."""
        return len(self.groups[0])

    @property
    def replicas(self) -> int:
        """Pipelines side by side (1 for data-parallel and pipeline)."""
        return len(self.groups)

    @property
    def two_workers_one_each(self) -> bool:
        """Whether this is one replica of two stages, each on its own single worker."""
        return len(self.groups) == 1 and len(self.groups[0]) == 2 and all(len(g) == 1 for g in self.groups[0])

    @property
    def pipelined(self) -> bool:
        """Whether stages run as separate tasks on separate workers."""
        return self.mode != "data"

    @property
    def workers(self) -> tuple[str, ...]:
        """Every worker that holds a stage, sorted."""
        return tuple(sorted({w for replica in self.groups for group in replica for w in group}))

    def stage_workers(self, stage: int, replica: int = 0) -> tuple[str, ...]:
        """Workers of stage ``stage`` in replica ``replica``."""
        return self.groups[replica][stage]

    def stages_on(self) -> dict[str, tuple[int, ...]]:
        """Worker address -> the stage indices it must load."""
        held: dict[str, set[int]] = {}
        for replica in self.groups:
            for k, group in enumerate(replica):
                for w in group:
                    held.setdefault(w, set()).add(k)
        return {w: tuple(sorted(ks)) for w, ks in sorted(held.items())}

    def regrouped(self, times: Sequence[float]) -> Placement:
        """The same workers per replica, shared among the stages again by new stage ``times``."""
        if not self.pipelined or self.shared is not None:
            return self
        groups = tuple(
            tuple(_split([w for group in replica for w in group], times)) for replica in self.groups
        )
        return Placement(self.mode, groups, self.reason)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return {
            "mode": self.mode,
            "replicas": self.replicas,
            "num_stages": self.num_stages,
            "groups": [[list(group) for group in replica] for replica in self.groups],
            "reason": self.reason,
            "shared": None if self.shared is None else {"stage": self.shared[0], "share": self.shared[1]},
        }

    def describe(self) -> str:
        """A few lines for the run's log."""
        lines = [f"placement: {self.mode} ({self.reason})"]
        if self.pipelined:
            for r, replica in enumerate(self.groups):
                prefix = f"  replica {r}: " if self.replicas > 1 else "  "
                lines.append(
                    prefix + "; ".join(f"stage {k} on {', '.join(group)}" for k, group in enumerate(replica))
                )
            if self.shared is not None:
                k, share = self.shared
                lines.append(
                    f"  stage {k} runs on its first worker for {share:.0%} of the chunks, on its second "
                    "for the rest"
                )
        return "\n".join(lines)


def stage_memory(plan: StagePlan, batch_size: int) -> tuple[int, ...]:
    """Bytes each stage needs: its weights plus its activations scaled to ``batch_size`` images.

    The plan's activation bytes were measured on its sample batch, so they scale with
    the ratio of batch sizes.
    """
    sample = max(1, plan.input_shape[0] if plan.input_shape else 1)
    return tuple(s.weight_bytes + -(-s.activation_bytes * batch_size // sample) for s in plan.stages)


def workers_from_scheduler(
    info: Mapping[str, Mapping[str, Any]], device_memory: Mapping[str, int | None] | None = None
) -> list[WorkerInfo]:
    """Build :class:`WorkerInfo` from ``client.scheduler_info()["workers"]``.

    Parameters
    ----------
    info
        The scheduler's worker records (``memory_limit``, ``resources``, ...).
    device_memory
        Worker address -> total bytes of its CUDA device, ``None`` without one.
    """
    out = []
    for address in sorted(info):
        record = info[address]
        gpu_bytes = (device_memory or {}).get(address)
        labelled = float((record.get("resources") or {}).get(DEVICE_RESOURCE, 0)) > 0
        if gpu_bytes:
            out.append(WorkerInfo(address, int(gpu_bytes), "GPU memory", True))
        else:
            out.append(WorkerInfo(address, int(record.get("memory_limit") or 0), "memory_limit", labelled))
    return out


def _devices(workers: Sequence[WorkerInfo]) -> list[WorkerInfo]:
    """Workers that hold a device, or every worker where none is labelled (a CPU cluster)."""
    labelled = [w for w in workers if w.device]
    return labelled or list(workers)


def _split(items: Sequence[str], weights: Sequence[float]) -> list[tuple[str, ...]]:
    """Share ``items`` among ``len(weights)`` groups, at least one each; extras go to the heaviest."""
    n, parts = len(items), len(weights)
    sizes = [1] * parts
    for _ in range(n - parts):
        # the group whose per-worker load is highest gets the next worker
        k = max(range(parts), key=lambda i: (weights[i] / sizes[i], -i))
        sizes[k] += 1
    out, start = [], 0
    for size in sizes:
        out.append(tuple(items[start : start + size]))
        start += size
    return out


def check_memory(
    placement: Placement, needs: Sequence[int], workers: Sequence[WorkerInfo], batch_size: int
) -> None:
    by_address = {w.address: w for w in workers}
    for address, stages in placement.stages_on().items():
        worker = by_address[address]
        need = sum(needs[k] for k in stages)
        if worker.memory_bytes and need > worker.memory_bytes:
            what = "the whole model" if len(stages) == len(needs) else f"stage(s) {list(stages)}"
            split = "more --stages" if placement.pipelined else "--stages with --placement pipeline"
            raise PlacementError(
                f"{placement.mode} placement puts {what} on {address}, which needs {format_bytes(need)} "
                f"(weights plus activations for batch {batch_size}) but that worker has "
                f"{format_bytes(worker.memory_bytes)} ({worker.memory_kind}); use {split}, "
                "a smaller --batch-size, or workers with more memory"
            )


def _pipeline(
    mode: str, devices: Sequence[WorkerInfo], stages: int, replicas: int, times: Sequence[float], reason: str
) -> Placement:
    addresses = [w.address for w in devices]
    per_replica = len(addresses) // replicas
    groups = tuple(
        tuple(_split(addresses[r * per_replica : (r + 1) * per_replica], times)) for r in range(replicas)
    )
    return Placement(mode, groups, reason)


def _stage_times(plan: StagePlan | None, stages: int) -> tuple[float, ...]:
    if plan is None:
        return (1.0,) * stages
    times = tuple(s.time_s for s in plan.stages)
    return times if sum(times) > 0 else (1.0,) * stages


def choose_placement(
    mode: str,
    plan: StagePlan | None,
    workers: Sequence[WorkerInfo],
    *,
    replicas: int | None = None,
    batch_size: int = 1,
    model: str = "model",
) -> Placement:
    """Decide which workers run which stages, and check that it fits.

    Parameters
    ----------
    mode
        ``"data"``, ``"pipeline"``, ``"hybrid"`` or ``"auto"``.
    plan
        The stage plan (``None`` for one stage: the whole model).
    workers
        The cluster's workers; those labelled with a ``GPU`` resource (or holding a CUDA
        device) run stages, or all of them where none is.
    replicas
        Pipelines side by side for ``"hybrid"``; ``None`` makes as many as fit.
    batch_size
        Images per forward pass, which scales each stage's activation memory.
    model
        Model name, for messages.

    Returns
    -------
    Placement
        The groups of workers per replica and stage, with the reason for the choice.

    Raises
    ------
    PlacementError
        When the placement needs more workers than the cluster has, or a worker cannot
        hold what is placed on it; the message names the numbers and the fix.
    """
    if not workers:
        raise PlacementError("the cluster has no workers to place stages on")
    stages = plan.num_stages if plan is not None else 1
    devices = _devices(workers)
    n = len(devices)
    needs = stage_memory(plan, batch_size) if plan is not None else (0,)
    times = _stage_times(plan, stages)
    what = "GPU-labelled workers" if any(w.device for w in workers) else "workers"
    data = Placement("data", (tuple(tuple(w.address for w in devices) for _ in range(stages)),), "")

    if mode == "auto":
        smallest = min(devices, key=lambda w: w.memory_bytes or float("inf"))
        whole = sum(needs)
        if stages == 1:
            mode, reason = "data", "one stage: every worker runs the whole model"
        elif not smallest.memory_bytes or whole <= smallest.memory_bytes:
            room = format_bytes(smallest.memory_bytes) if smallest.memory_bytes else "no stated limit"
            reason = (
                f"{model} needs {format_bytes(whole)} with batch {batch_size} and the smallest of {n} {what} "
                f"has {room}, so every worker holds all {stages} stages and no activations move"
            )
            mode = "data"
        else:
            slowest = imbalance(times)
            reason = (
                f"{model} needs {format_bytes(whole)} with batch {batch_size} but the smallest worker has "
                f"{format_bytes(smallest.memory_bytes)} ({smallest.memory_kind}); its {stages} stages need "
                f"{', '.join(format_bytes(b) for b in needs)}, measured stage times "
                f"{', '.join(f'{t * 1e3:.2f}' for t in times)} ms (max/mean {slowest:.2f})"
            )
            mode = "hybrid" if n >= 2 * stages else "pipeline"
            if n < stages:
                raise PlacementError(
                    f"{model} does not fit one worker ({reason}) and a pipeline needs {stages} {what} "
                    f"(1 per stage) but the cluster has {n}; add workers or use more memory per worker"
                )
        if mode == "data":
            placement = Placement("data", data.groups, reason)
        elif mode == "pipeline":
            placement = _pipeline("pipeline", devices, stages, 1, times, reason + "; pipelined")
        else:
            count = n // stages
            placement = _pipeline(
                "hybrid", devices, stages, count, times, reason + f"; {count} pipelines side by side"
            )
        check_memory(placement, needs, devices, batch_size)
        return placement

    if mode == "data":
        reason = f"every one of {n} {what} holds all {stages} stage(s); chunks go where their data is"
        placement = Placement("data", data.groups, reason)
    elif mode == "pipeline":
        if n < stages:
            raise PlacementError(
                f"pipeline needs {stages} {what} (1 per stage) but the cluster has {n}; "
                f"use --stages {n} or add workers"
            )
        reason = f"{stages} stages on {n} {what}, one group per stage"
        placement = _pipeline("pipeline", devices, stages, 1, times, reason)
    elif mode == "hybrid":
        count = replicas if replicas is not None else max(1, n // stages)
        if count * stages > n:
            raise PlacementError(
                f"hybrid needs {count * stages} {what} ({count} replicas x {stages} stages) but the cluster "
                f"has {n}; use --replicas {max(1, n // stages)}, fewer --stages, or add workers"
            )
        reason = f"{count} replicas of a {stages}-stage pipeline on {n} {what}"
        placement = _pipeline("hybrid", devices, stages, count, times, reason)
    else:
        raise PlacementError(f"placement={mode!r} is not one of {', '.join(PLACEMENTS)}")
    check_memory(placement, needs, devices, batch_size)
    return placement


def with_plan(
    placement: Placement, plan: StagePlan, workers: Sequence[WorkerInfo], *, batch_size: int
) -> Placement:
    """``placement`` with its workers shared among the stages again by ``plan``'s times, checked to fit.

    For a plan measured again after the placement was chosen (on a stage worker, with
    its threads and the run's batch): the mode and the workers per replica stay.
    """
    after = placement.regrouped(_stage_times(plan, plan.num_stages))
    devices = _devices(workers)
    check_memory(after, stage_memory(plan, batch_size), devices, batch_size)
    return after


def on_workers(
    placement: Placement,
    workers: Sequence[WorkerInfo],
    times: Sequence[float],
    *,
    needs: Sequence[int] | None = None,
    batch_size: int = 1,
) -> Placement:
    """``placement``'s stages placed again on ``workers`` (after some were lost or joined).

    The mode and the number of stages stay; replicas are as many as the workers allow
    (at most as many as before), and each replica's workers are shared among its stages by
    ``times``. ``needs`` (bytes per stage), when given, is checked against each worker.

    Raises
    ------
    PlacementError
        When fewer workers than stages are left; the message says how many are needed.
    """
    if not placement.pipelined:
        return placement
    devices = _devices(workers)
    stages, n = placement.num_stages, len(devices)
    if placement.shared is not None:
        if n < 2:
            raise PlacementError(
                f"the {placement.mode} placement shares stage {placement.shared[0]} between 2 workers "
                f"and {n} {'is' if n == 1 else 'are'} left"
            )
        shared = _shared(
            placement.mode,
            _kept_pair(placement, [d.address for d in devices]),
            placement.shared[0],
            times,
            f"{stages} stages placed again on 2 of the {n} workers present, stage "
            f"{placement.shared[0]} shared",
        )
        if needs is not None:
            check_memory(shared, needs, devices, batch_size)
        return shared
    if n < stages:
        raise PlacementError(
            f"the {placement.mode} placement needs {stages} workers (1 per stage) and {n} are left"
        )
    replicas = max(1, min(placement.replicas, n // stages))
    mode = placement.mode if replicas > 1 or placement.mode == "pipeline" else "pipeline"
    reason = f"{stages} stages placed again on the {n} workers present"
    after = _pipeline(mode, devices, stages, replicas, times, reason)
    if needs is not None:
        check_memory(after, needs, devices, batch_size)
    return after


def _kept_pair(placement: Placement, present: Sequence[str]) -> tuple[str, str]:
    """The two workers to share ``placement``'s boundary stage among those ``present``: each
    survivor of its pair keeps its role (and the stages it has loaded); new workers fill the rest."""
    replica = placement.groups[0]
    old = (replica[0][0], replica[-1][0])
    kept = [w if w in present else None for w in old]
    spare = iter(w for w in present if w not in kept)
    first, second = (w if w is not None else next(spare) for w in kept)
    return first, second


def _shared(mode: str, pair: tuple[str, str], stage: int, times: Sequence[float], reason: str) -> Placement:
    first, second = pair
    before, middle, after = sum(times[:stage]), times[stage], sum(times[stage + 1 :])
    groups = tuple((first,) for _ in range(stage)) + ((first, second),)
    groups += tuple((second,) for _ in range(stage + 1, len(times)))
    share = boundary_share(before, middle, after, SHARED_LEAD)
    return Placement(mode, (groups,), reason, shared=(stage, share))


def share_boundary(
    placement: Placement, plan: StagePlan, workers: Sequence[WorkerInfo], *, batch_size: int
) -> Placement:
    """``placement`` for ``plan``: regrouped by its times, or, for a ``shared_stage``, on two workers.

    With a shared stage, the first of ``placement``'s two workers runs the stages before
    it and the second those after; the shared stage runs on the first for the share of
    chunks that leaves the first :data:`~dask_infer.partition.balance.SHARED_LEAD` lighter
    than the second (:func:`~dask_infer.partition.balance.boundary_share`). The fit is checked.

    Raises
    ------
    PlacementError
        When ``placement`` is not one replica of two single-worker stages, or a worker cannot
        hold its stages.
    """
    if plan.shared_stage is None:
        return with_plan(placement, plan, workers, batch_size=batch_size)
    if not placement.two_workers_one_each:
        raise PlacementError(
            f"a shared boundary stage needs a pipeline of 2 stages on 2 workers, not {placement.describe()}"
        )
    ((first,), (second,)) = placement.groups[0]
    times = _stage_times(plan, plan.num_stages)
    after = _shared(
        placement.mode,
        (first, second),
        plan.shared_stage,
        times,
        f"{placement.reason}; stage {plan.shared_stage} held by both",
    )
    check_memory(after, stage_memory(plan, batch_size), _devices(workers), batch_size)
    return after
