"""Executing a run's chunks: the runtimes it registers, and the feed that keeps a pipeline full.

Data-parallel runs submit every chunk at once and let Dask order them. A pipeline is fed
through a bounded window, one chunk per chunk written, and may re-cut its stages on the
way by the stage times its workers measure.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from distributed import Client, Future

from dask_infer.config import RunConfig
from dask_infer.io.images import ImageSource
from dask_infer.partition.models import LoadedModel, build_model
from dask_infer.workflows.graph import ChunkPlan, submit_chunks, submit_pipeline
from dask_infer.workflows.monitor import stage_summary, track
from dask_infer.workflows.plan import Placement
from dask_infer.workflows.rebalance import Rebalance, imbalance, rebalanced_cuts
from dask_infer.workflows.runtime import ModelRuntime, RuntimeSpec

__all__ = ["Execution", "execute", "runtime_stats", "seconds_per_image"]


def _recut_here(
    spec: RuntimeSpec, measured: tuple[float, ...], sample: tuple[int, ...]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Task body: cut points balanced by ``measured``, profiled as this worker runs the model."""
    module = build_model(spec.model, weights=spec.weights, num_classes=spec.num_classes).module
    return rebalanced_cuts(module, spec.cut_points, measured, sample=sample, label=spec.model)


def runtime_stats(client: Client, name: str) -> dict[str, dict[str, Any]]:
    """Each worker's figures for the runtime registered as ``name``, by worker address."""
    return client.run(lambda dask_worker: dask_worker.plugins[name].stats())


def seconds_per_image(stats: dict[str, dict[str, Any]], stages: int) -> tuple[float, ...]:
    """Compute seconds per image of each stage, over the workers that ran it (0 if none did)."""
    return tuple(row["work_seconds_per_image"] or 0.0 for row in stage_summary(stats, 1.0, stages))


@dataclass
class Execution:
    """What a run has registered and decided so far: it changes when the stages are re-cut."""

    spec: RuntimeSpec
    placement: Placement
    active: list[str] = field(default_factory=list)
    loads: int = 0
    rebalance: Rebalance | None = None
    last_start: float = 0.0

    def register(self, client: Client) -> str:
        """Register a runtime for the current spec; it loads on the workers before this returns."""
        name = f"dask-infer-runtime-{uuid.uuid4().hex[:8]}"
        client.register_plugin(ModelRuntime(self.spec, name), name=name)
        self.active.append(name)
        self.loads += sum(s["loads"] for s in runtime_stats(client, name).values())
        return name

    def release(self, client: Client, name: str) -> None:
        """Unregister a runtime, which frees its stages on every worker."""
        self.active.remove(name)
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)


def _wave(placement: Placement) -> int:
    """Chunks to measure stage times on: a few per stage of every replica."""
    return placement.replicas * max(4, placement.num_stages + 1)


def _window(placement: Placement) -> int:
    """Chunks a pipeline keeps in flight: enough that every stage always has one waiting."""
    return 2 * _wave(placement)


def _first_wave(config: RunConfig, placement: Placement, chunks: ChunkPlan) -> int:
    """Chunks written before the stage times are judged; 0 to not re-cut.

    The run needs chunks left after the judgement (and the re-cut, which runs while
    the window keeps the stages busy) for a new cut to pay off.
    """
    if config.rebalance is None or not placement.pipelined or placement.num_stages < 2:
        return 0
    wave = _wave(placement)
    return wave if len(chunks.bounds) >= 4 * wave else 0


class _Feed:
    """Feeds a pipeline one chunk per chunk written, re-cutting its stages on the way.

    The first ``window`` chunks are submitted at once; each written chunk submits the
    next, so the chunks in flight (and the activations held between stages) stay
    bounded however long the dataset. After ``wave`` chunks are written, the measured
    stage times are judged; a re-cut, when they are unbalanced beyond the threshold,
    is computed on a stage-0 worker while the chunks already in flight keep every
    stage busy, and the chunks submitted after it arrives use the new cut.
    """

    def __init__(
        self,
        client: Client,
        config: RunConfig,
        loaded: LoadedModel,
        run: Execution,
        chunks: ChunkPlan,
        submit: Callable[[list[int]], list[Future]],
        say: Callable[[str], None],
    ) -> None:
        self.client, self.config, self.loaded, self.run, self.say = client, config, loaded, run, say
        self.submit = submit
        self.n = len(chunks.bounds)
        self.batch = min(run.spec.batch_size or 32, chunks.size)
        self.wave = _first_wave(config, run.placement, chunks)
        self.window = min(_window(run.placement), self.n)
        self.pending = list(range(self.window, self.n))
        self.written = 0
        self.recut: Future | None = None
        self.measured: tuple[float, ...] = ()

    def start(self) -> list[Future]:
        """Submit the first window of chunks."""
        return self.submit(list(range(self.window)))

    def refill(self) -> list[Future]:
        """After a chunk is written: judge, switch to a new cut if one is ready, submit the next."""
        self.written += 1
        if self.wave and self.written == self.wave:
            self._judge()
        # Wait for a pending re-cut only when the last chunks would otherwise miss it.
        if self.recut is not None and (self.recut.done() or len(self.pending) <= 1):
            recut, self.recut = self.recut, None
            try:
                new_cuts, predicted = recut.result()
            except Exception as exc:
                # A failed re-cut costs the better balance, not the run.
                self.say(f"rebalance: re-cut failed ({type(exc).__name__}: {exc}); keeping the current cut")
                new_cuts, predicted = self.run.spec.cut_points, self.measured
            self._switch(new_cuts, predicted)
        return self.submit([self.pending.pop(0)]) if self.pending else []

    def _judge(self) -> None:
        run, before = self.run, self.run.placement
        stats = runtime_stats(self.client, run.active[-1])
        self.measured = seconds_per_image(stats, before.num_stages)
        # What limits throughput is a stage's time per image over the workers that share it.
        effective = [t / len(before.stage_workers(k)) for k, t in enumerate(self.measured)]
        assert self.config.rebalance is not None
        if imbalance(effective) <= self.config.rebalance or not self.pending:
            self._record(run.spec.cut_points, self.measured, before, chunks_before=self.n)
            return
        size = self.loaded.input_size
        self.recut = self.client.submit(
            _recut_here,
            run.spec,
            self.measured,
            (self.batch, 3, size, size),
            workers=list(before.stage_workers(0)),
            pure=False,
            key=f"{self.loaded.name}-recut-{uuid.uuid4().hex[:8]}",
        )

    def _switch(self, new_cuts: tuple[str, ...], predicted: tuple[float, ...]) -> None:
        run, before = self.run, self.run.placement
        if tuple(new_cuts) == tuple(run.spec.cut_points):
            self._record(run.spec.cut_points, predicted, before, chunks_before=self.n)
            return
        after = before.regrouped(predicted)
        # Every chunk submitted so far runs through the old runtime, which stays until the end.
        self._record(tuple(new_cuts), predicted, after, chunks_before=self.n - len(self.pending))
        run.spec = replace(run.spec, cut_points=tuple(new_cuts), stage_map=tuple(after.stages_on().items()))
        run.placement = after
        run.register(self.client)
        if after.groups != before.groups:
            self.say(after.describe())
        run.last_start = time.perf_counter()

    def _record(
        self, cuts: tuple[str, ...], predicted: tuple[float, ...], after: Placement, *, chunks_before: int
    ) -> None:
        assert self.config.rebalance is not None
        self.run.rebalance = Rebalance(
            self.config.rebalance,
            self.run.spec.cut_points,
            self.measured,
            tuple(cuts),
            tuple(predicted),
            chunks_measured=self.wave,
            chunks_before=chunks_before,
            placement_before=self.run.placement.to_dict(),
            placement_after=after.to_dict(),
        )
        self.say(self.run.rebalance.describe())


def execute(
    client: Client,
    config: RunConfig,
    loaded: LoadedModel,
    source: ImageSource,
    output: Any,
    chunks: ChunkPlan,
    run: Execution,
    on_done: Callable[[int], None],
    say: Callable[[str], None],
) -> None:
    """Submit the chunks: all at once for data-parallel runs, fed through a window for pipelines."""

    def submit(indices: list[int] | None) -> list[Future]:
        placement, name = run.placement, run.active[-1]
        if placement.pipelined:
            return submit_pipeline(
                client, source, output, name, chunks, placement, label=loaded.name, indices=indices
            )
        everywhere = len(placement.workers) == len(client.scheduler_info(n_workers=-1)["workers"])
        return submit_chunks(
            client,
            source,
            output,
            name,
            chunks,
            label=loaded.name,
            workers=None if everywhere else placement.workers,
        )

    run.last_start = time.perf_counter()
    if not run.placement.pipelined:
        track(submit(None), progress=config.progress, on_done=on_done)
        return
    feed = _Feed(client, config, loaded, run, chunks, submit, say)
    track(feed.start(), progress=config.progress, on_done=on_done, refill=feed.refill)
