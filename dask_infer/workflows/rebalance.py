"""Re-cutting a running pipeline: judge its measured stage times, re-cut on a stage worker, switch.

The first chunks of a pipeline say how long each stage really takes on its workers.
When the slowest stage exceeds the mean by the run's threshold, a re-cut
(:func:`dask_infer.partition.recut.rebalanced_cuts`) is computed on a stage-0 worker
while the chunks in flight keep every stage busy; the chunks submitted after it
arrives run on the new cut.

A pipeline whose boundary stage both workers hold (``Placement.shared``) is not cut
again: after every wave of chunks, the share of that stage's chunks its first worker
runs is set anew from the measured stage times (:func:`measured_share`). Both workers
hold the stage already, so nothing loads or compiles: only where later chunks run
changes. A profile taken on one worker alone prices the stages apart from the reads,
writes and transfers beside them: for ResNet-50 int8+compile on two cores (before int8
stages were cut once) the planned share was 17-25% and the measured one 0-9%.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from distributed import Client, Future, secede

from dask_infer.models import build_model
from dask_infer.partition.balance import SHARED_LEAD, boundary_share, imbalance
from dask_infer.partition.recut import rebalanced_cuts
from dask_infer.workflows.execution import Execution, runtime_stats, seconds_per_image
from dask_infer.workflows.feed import wave, window
from dask_infer.workflows.graph import group_name, over_pipeline
from dask_infer.workflows.placement import Placement
from dask_infer.workflows.stages import RuntimeSpec

__all__ = [
    "RESHARE_STEP",
    "Rebalance",
    "Rebalancer",
    "Reshare",
    "first_wave",
    "measured_share",
    "recut_pays_off",
    "recut_saving",
]


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

        before = (
            f"stage times {_times(self.measured_before)} (max/mean {imbalance(self.measured_before):.2f}) "
            f"with cuts {', '.join(self.cuts_before)}"
        )
        if not self.recut:
            return f"rebalance: {before}; kept (threshold {self.threshold:.2f})"
        return (
            f"rebalance: {before} exceeds {self.threshold:.2f}\n"
            f"  re-cut at {', '.join(self.cuts_after)}: predicted {_times(self.predicted_after)} "
            f"(max/mean {imbalance(self.predicted_after):.2f})"
        )


@dataclass(frozen=True)
class Reshare:
    """How a shared boundary stage was routed by measured stage times, for the log, the summary
    and the output's attrs (see :meth:`Rebalancer.after_write`).

    Attributes
    ----------
    stage
        The shared stage.
    shares
        Its share on its first worker: the planned one, then each one set from measured times.
    measured
        Stage seconds per image, the latest measured, over ``chunks_measured`` chunks.
    chunks_measured
        Chunks written when they were measured.
    placement_before, placement_after
        The placement as planned and as it routes chunks now (``Placement.to_dict``).
    """

    stage: int
    shares: tuple[float, ...]
    measured: tuple[float, ...]
    chunks_measured: int
    placement_before: dict[str, Any]
    placement_after: dict[str, Any]

    @property
    def reshared(self) -> bool:
        """Whether the share was changed."""
        return len(self.shares) > 1

    def worker_times(self) -> tuple[float, float]:
        """Seconds per image of the two workers with the current share, by the measured times."""
        ts, stage, share = self.measured, self.stage, self.shares[-1]
        return sum(ts[:stage]) + share * ts[stage], sum(ts[stage + 1 :]) + (1 - share) * ts[stage]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return {
            "reshare": True,
            "stage": self.stage,
            "shares": list(self.shares),
            "stage_seconds_per_image": list(self.measured),
            "chunks_measured": self.chunks_measured,
            "placement_before": self.placement_before,
            "placement_after": self.placement_after,
        }

    def describe(self) -> str:
        """One line: the measured times, the shares and the two workers' times they give."""
        shares = " -> ".join(f"{s:.0%}" for s in self.shares)
        return (
            f"rebalance: stage times {_times(self.measured)} over {self.chunks_measured} chunks; "
            f"stage {self.stage}'s share on its first worker {shares}{'' if self.reshared else ' (kept)'}, "
            f"which gives the two workers {_times(self.worker_times())}"
        )


def _times(ts: Sequence[float]) -> str:
    return ", ".join(f"{t * 1e3:.2f}" for t in ts) + " ms/image"


def first_wave(threshold: float | None, placement: Placement, n_chunks: int) -> int:
    """Chunks written before the stage times are judged; 0 to not re-cut.

    The run needs chunks left after the judgement (and the re-cut, which runs while
    the window keeps the stages busy) for a new cut to pay off.
    """
    if threshold is None or not placement.pipelined or placement.num_stages < 2:
        return 0
    size = wave(placement)
    return size if n_chunks >= 4 * size else 0


_NEGLIGIBLE_S = 1.0
"""Loading time beyond the chunks in flight that never stops a re-cut."""


RESHARE_STEP = 0.05
"""A share measured closer than this to the current one leaves the routing as it is: stage
times measured over a few chunks move the share by a few points from wave to wave."""


def measured_share(measured: Sequence[float], stage: int) -> float | None:
    """The share of a shared ``stage``'s chunks its first worker should run, by ``measured``
    stage times (seconds per image), with the first worker :data:`SHARED_LEAD` ahead;
    ``None`` while a stage has no time yet.

    Examples
    --------
    >>> round(measured_share([4.0, 2.0, 5.0], 1), 3)
    0.704
    """
    if len(measured) <= stage or any(t <= 0 for t in measured):
        return None
    return boundary_share(sum(measured[:stage]), measured[stage], sum(measured[stage + 1 :]), SHARED_LEAD)


def recut_pays_off(saving_s: float, lost_s: float) -> bool:
    """Whether a re-cut that may save ``saving_s`` is worth ``lost_s`` of loading with stages idle.

    Under a second either way the choice hardly matters, and the better cut is taken.
    """
    return lost_s <= max(saving_s, _NEGLIGIBLE_S)


def recut_saving(effective: Sequence[float], images_left: int) -> float:
    """Seconds a perfect re-cut could save over ``images_left`` images, at most.

    ``effective`` is each stage's seconds per image over the workers sharing it; the
    slowest sets the pace now, and no cut does better than their mean.
    """
    if not effective:
        return 0.0
    return max(0, images_left) * (max(effective) - sum(effective) / len(effective))


def _recut_here(
    spec: RuntimeSpec, measured: tuple[float, ...], sample: tuple[int, ...]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Task body: cut points balanced by ``measured``, profiled as this worker runs the model.

    The profile takes seconds; the task leaves the worker's thread pool first
    (``distributed.secede``), so that on a worker of one thread the stage tasks behind it
    do not wait for it, and the pipeline keeps running meanwhile.
    """
    secede()
    module = build_model(spec.model, weights=spec.weights, num_classes=spec.num_classes).module
    return rebalanced_cuts(module, spec.cut_points, measured, sample=sample, label=spec.label)


class Rebalancer:
    """Judges a pipeline's stage times after its first wave of chunks, and re-cuts it; or, where
    both workers hold a shared boundary stage, sets that stage's share after every wave.

    Parameters
    ----------
    client
        The run's client.
    run
        The run's runtimes; a re-cut registers a new one and switches to it.
    threshold
        Re-cut when the slowest stage's time per image (over the workers sharing it)
        exceeds the mean by this factor.
    n_chunks
        Chunks in the run.
    batch
        Images per forward pass of the profile a re-cut takes.
    say
        Where log lines go.
    chunk_images
        Images per chunk. With it, a re-cut is skipped when even a perfect balance would
        save less time over the chunks left than loading the new stages (compiled stages
        compile again) takes beyond what the chunks in flight keep the old ones busy for,
        and that is over a second; 0 re-cuts whenever the imbalance is over the threshold.
    """

    def __init__(
        self,
        client: Client,
        run: Execution,
        threshold: float,
        n_chunks: int,
        batch: int,
        say: Callable[[str], None],
        *,
        chunk_images: int = 0,
    ) -> None:
        self.client, self.run, self.threshold, self.say = client, run, threshold, say
        self.n = n_chunks
        self.batch = batch
        self.chunk_images = chunk_images
        self.wave = first_wave(threshold, run.placement, n_chunks)
        self.recut: Future | None = None
        self.measured: tuple[float, ...] = ()
        self.record: Rebalance | Reshare | None = None
        """What the last judgement decided: a re-cut (or cuts kept), or a shared stage's shares."""

    def stop(self, reason: str) -> None:
        """Judge and re-cut no more (the stages were placed again); a pending re-cut is dropped."""
        if self.recut is not None:
            self.recut.cancel()
            self.recut = None
        if self.wave and self.record is None:
            self.say(f"rebalance: not judged ({reason})")
        self.wave = 0

    def after_write(self, written: int, pending: int) -> None:
        """Called after each written chunk, with the count written and the count not yet submitted."""
        if self.run.placement.shared is not None:
            if self.wave and written % self.wave == 0 and pending:
                self._reshare(written)
            return
        if self.wave and written == self.wave:
            self._judge(pending)
        # Wait for a pending re-cut only when the last chunks would otherwise miss it.
        if self.recut is not None and (self.recut.done() or pending <= 1):
            recut, self.recut = self.recut, None
            try:
                new_cuts, predicted = recut.result()
            except Exception as exc:
                # A failed re-cut costs the better balance, not the run.
                self.say(f"rebalance: re-cut failed ({type(exc).__name__}: {exc}); keeping the current cut")
                new_cuts, predicted = self.run.spec.cut_points, self.measured
            self._switch(new_cuts, predicted, pending)

    def _judge(self, pending: int) -> None:
        run, before = self.run, self.run.placement
        stats = runtime_stats(self.client, run.current)
        self.measured = seconds_per_image(stats, before.num_stages)
        # What limits throughput is a stage's time per image over the workers that share it.
        effective = [t / len(before.stage_workers(k)) for k, t in enumerate(self.measured)]
        if imbalance(effective) <= self.threshold or not pending:
            self._record(run.spec.cut_points, self.measured, before, chunks_before=self.n)
            return
        if self.chunk_images:
            # Chunks in flight run through the current cut whatever is decided: only those
            # not yet submitted can gain. The new stages load (compile) while the window in
            # flight keeps the old ones busy; what loading takes beyond that is lost.
            saving = recut_saving(effective, pending * self.chunk_images)
            reload_s = max((float(row.get("load_s") or 0.0) for row in stats.values()), default=0.0)
            covered = window(before) * self.chunk_images * max(effective)
            if not recut_pays_off(saving, reload_s - covered):
                self.say(
                    f"rebalance: a re-cut could save at most {saving:.1f} s over the {pending} chunk(s) "
                    f"left, less than the {reload_s - covered:.1f} s its stages would take to load beyond "
                    "the chunks in flight; keeping the current cut"
                )
                self._record(run.spec.cut_points, self.measured, before, chunks_before=self.n)
                return
        self.recut = self.client.submit(
            _recut_here,
            run.spec,
            self.measured,
            (self.batch, *run.spec.model_input),
            workers=list(before.stage_workers(0)),
            pure=False,
            key=f"{group_name('recut', run.spec.label)}-{uuid.uuid4().hex[:8]}",
            # Started at once, beside the chunks in flight, rather than after them.
            priority=over_pipeline(before.num_stages),
        )

    def _reshare(self, written: int) -> None:
        """Route the shared stage of the chunks not yet submitted by the stage times measured so far."""
        placement = self.run.placement
        assert placement.shared is not None
        stage, share = placement.shared
        self.measured = seconds_per_image(runtime_stats(self.client, self.run.current), placement.num_stages)
        new = measured_share(self.measured, stage)
        if new is None:
            return
        earlier = self.record if isinstance(self.record, Reshare) else None
        shares = earlier.shares if earlier is not None else (share,)
        first = earlier.placement_before if earlier is not None else placement.to_dict()
        changed = abs(new - share) >= RESHARE_STEP
        if changed:
            placement = replace(placement, shared=(stage, new))
            self.run.placement = placement
            shares = (*shares, new)
        record = Reshare(stage, shares, self.measured, written, first, placement.to_dict())
        if changed or earlier is None:
            self.say(record.describe())
        self.record = record

    def _switch(self, new_cuts: tuple[str, ...], predicted: tuple[float, ...], pending: int) -> None:
        run, before = self.run, self.run.placement
        if tuple(new_cuts) == tuple(run.spec.cut_points):
            self._record(run.spec.cut_points, predicted, before, chunks_before=self.n)
            return
        after = before.regrouped(predicted)
        # Every chunk submitted so far runs through the old runtime, which stays until the end.
        self._record(tuple(new_cuts), predicted, after, chunks_before=self.n - pending)
        run.spec = replace(run.spec, cut_points=tuple(new_cuts), stage_map=tuple(after.stages_on().items()))
        run.placement = after
        run.register(self.client)
        if after.groups != before.groups:
            self.say(after.describe())
        run.last_start = time.perf_counter()

    def _record(
        self, cuts: tuple[str, ...], predicted: tuple[float, ...], after: Placement, *, chunks_before: int
    ) -> None:
        self.record = Rebalance(
            self.threshold,
            self.run.spec.cut_points,
            self.measured,
            tuple(cuts),
            tuple(predicted),
            chunks_measured=self.wave,
            chunks_before=chunks_before,
            placement_before=self.run.placement.to_dict(),
            placement_after=after.to_dict(),
        )
        self.say(self.record.describe())
