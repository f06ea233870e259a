"""Tiles through a model cut into stages: the plan, the placement's tasks, and the stage workers' watch.

With ``stages`` above one, a tiled run cuts the model as a chunked run does, balanced on a
window of the run's own size. A dense model that ends by resizing its map to its input's
size is cut without that resize (:mod:`dask_infer.partition.tail`), which its last stage's
worker applies, so a tile's map comes out as the whole model gives it. Under a ``data``
placement each worker holds every stage and a tile is one model task, as in a one-stage
run; under ``pipeline`` and ``hybrid`` a tile is one task per stage, each on that stage's
workers, the activation passing from stage to stage. A stage worker that leaves stops the
feed (:class:`StageWorkerLost`); the run then places the stages again on the workers there
are and runs the tiles not yet written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
from distributed import Client, get_worker

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.models import LoadedModel
from dask_infer.models.tracing import running_modules
from dask_infer.partition import StagePlan, partition_model
from dask_infer.partition.split import resize_tail
from dask_infer.partition.tail import ResizeTail
from dask_infer.tiles.results import TileWork
from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.graph import stage_prefix
from dask_infer.workflows.placement import Placement
from dask_infer.workflows.runtime import ModelRuntime, StageOutput, compute_executor
from dask_infer.workflows.slots import leave_worker_slot

__all__ = [
    "StageWorkerLost",
    "TileStages",
    "plan_tile_stages",
    "stage_workers_check",
    "submit_tile_stages",
    "tile_stage",
]


@dataclass(frozen=True)
class TileStages:
    """A tiled run's cut: the stage plan and, for a dense model, the resize its last stage applies."""

    plan: StagePlan
    tail: ResizeTail | None = None


def plan_tile_stages(
    config: RunConfig,
    loaded: LoadedModel,
    model_input: tuple[int, int, int],
    dense: bool,
    say: Callable[[str], None],
) -> TileStages | None:
    """``loaded`` cut into ``config.stages`` stages balanced on a window of ``model_input`` (``None``: one).

    Raises
    ------
    ModelError
        The model has fewer cut points than stages less one (a dense model whose map
        does not end with a resize to its input's size may have none).
    """
    if config.stages == 1:
        return None
    tail = resize_tail(loaded.module) if dense else None
    partition = partition_model(
        loaded.module,
        config.stages,
        balance=config.balance,
        sample=(1, *model_input),
        name=loaded.name,
        repeats=2,
        strip_tail=tail is not None,
    )
    cuts = ", ".join(partition.plan.cut_points)
    say(
        f"stages: {loaded.name} cut after {cuts} (balanced by {config.balance} on a window of "
        f"{model_input[1]}x{model_input[2]})"
        + ("; the last stage resizes its map to the window" if tail else "")
    )
    return TileStages(partition.plan, tail)


def tile_stage(
    runtime: str, stage: int, data: np.ndarray | StageOutput, work: TileWork
) -> StageOutput | dict[str, np.ndarray]:
    """Task body: stage ``stage`` of the worker's runtime on one tile task; the last gives its results.

    Stage 0 takes the task's pixels (a classifier's row cut into its windows first); the
    others, the previous stage's :class:`StageOutput`. Runs on the runtime's compute executor,
    the worker's thread given back meanwhile (:func:`leave_worker_slot`).
    """
    leave_worker_slot()
    plugin: ModelRuntime = get_worker().plugins[runtime]  # type: ignore[assignment]
    if stage == 0:
        assert isinstance(data, np.ndarray)
        data = work.model_input(data)
    with running_modules():
        out = plugin.run_stage(stage, data)
    if isinstance(out, StageOutput):
        return out
    return work.results(torch.from_numpy(out["logits"]))


def submit_tile_stages(
    client: Client,
    placement: Placement,
    runtime: str,
    label: str,
    index: int,
    suffix: str,
    read: Callable[..., Any],
    read_args: tuple[Any, ...],
    work: TileWork,
) -> Any:
    """The read and stage tasks of the run's ``index``-th tile task; the last stage's future.

    Tile task ``index`` goes to replica ``index % replicas``; its read runs on that
    replica's stage-0 workers, so pixels never travel, and stage ``k`` only on the
    replica's stage-``k`` workers. Later stages outrank earlier ones, so a worker passes
    tiles on before it starts new ones.
    """
    replica = index % placement.replicas
    stages = placement.num_stages
    data = client.submit(
        read,
        *read_args,
        key=f"read_tile-{suffix}",
        priority=0,
        workers=list(placement.stage_workers(0, replica)),
        allow_other_workers=False,
    )
    for k in range(stages):
        with dask.annotate(executor=compute_executor(runtime)):
            data = client.submit(
                tile_stage,
                runtime,
                k,
                data,
                work,
                key=f"{stage_prefix(label, k)}_tile-{suffix}",
                priority=1 + k,
                workers=list(placement.stage_workers(k, replica)),
                allow_other_workers=False,
            )
    return data


class StageWorkerLost(DaskInferError):
    """A worker holding stages of a pipelined tiled run left the cluster."""

    def __init__(self, worker: str, stages: Sequence[int]) -> None:
        self.worker = worker
        self.stages = tuple(stages)
        held = ", ".join(map(str, self.stages))
        self.line = f"worker {worker} holding stage(s) {held} of the pipeline left the cluster"
        super().__init__(
            f"{self.line}; the tiles written so far are kept: run again with --resume to finish the rest"
        )


def stage_workers_check(client: Client, placement: Placement) -> Callable[[], None]:
    """A check that raises :class:`StageWorkerLost` once a worker holding a stage has left the cluster.

    Tile tasks of a stage run only on its workers, so without them the run could not end.
    """
    needed: Sequence[str] = placement.workers

    def check() -> None:
        alive = scheduler_workers(client)
        lost = [w for w in needed if w not in alive]
        if lost:
            raise StageWorkerLost(lost[0], placement.stages_on()[lost[0]])

    return check
