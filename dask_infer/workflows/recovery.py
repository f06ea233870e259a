"""A pipeline that loses a worker, or gains one: re-place its stages and go on.

A pipeline's stage tasks may only run on the workers their stage is placed on, so a
worker that dies (or is restarted by its nanny under a new address) leaves its stages'
chunks waiting forever. :class:`PipelineGuard` watches the scheduler's workers while a
pipeline runs. When the workers holding stages change, the chunks in flight are
cancelled, the stages are placed again on the workers present (waiting a little for a
nanny to bring a lost worker back), a runtime holding the new placement is registered,
and the chunks in flight that the completion manifest does not record as written are
submitted again. Chunks already written are never computed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from distributed import Client

from dask_infer.errors import DaskInferError
from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.execution import Execution
from dask_infer.workflows.feed import WorkersChanged
from dask_infer.workflows.placement import DEVICE_RESOURCE, PlacementError, WorkerInfo, on_workers

__all__ = ["PipelineGuard", "Recovery", "WorkersLostError"]

RESTART_GRACE_S = 15.0
"""How long a re-placement waits for the cluster to have as many workers as before (a nanny's restart)."""
RESTART_WAIT_S = 120.0
"""How long it waits for enough workers to hold one stage each before it stops the run."""


class WorkersLostError(DaskInferError):
    """Too few workers are left to hold a pipeline's stages; the run stops, resumable."""


@dataclass(frozen=True)
class Recovery:
    """One re-placement of a running pipeline, for the log, the summary and the output's attrs."""

    lost: tuple[str, ...]
    joined: tuple[str, ...]
    written_before: int
    """Chunks written when the change was noticed."""
    resubmitted: tuple[int, ...]
    """Chunks that were in flight, not written, and were submitted again."""
    seconds: float
    """From noticing the change to the new stages being loaded."""
    placement_after: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return {
            "lost": list(self.lost),
            "joined": list(self.joined),
            "written_before": self.written_before,
            "resubmitted": list(self.resubmitted),
            "seconds": self.seconds,
            "placement_after": self.placement_after,
        }


def _changed(before: Sequence[str], now: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(before) - set(now))), tuple(sorted(set(now) - set(before)))


class PipelineGuard:
    """Watches a running pipeline's workers and re-places its stages when they change.

    Parameters
    ----------
    client
        The run's client.
    run
        The run's runtimes and placement; a re-placement releases the old runtimes and
        registers one for the new placement.
    workers
        The cluster's workers as placement sees them (addresses, memory, device labels).
    times
        The current stages' relative costs, to share workers among them.
    written
        The chunks the output's completion manifest records as written.
    say
        Where log lines go.
    needs, batch_size
        Bytes each stage needs, checked against each worker of a new placement; ``None``
        to not check (the cut changed since they were measured).
    grace_s, wait_s
        See :data:`RESTART_GRACE_S` and :data:`RESTART_WAIT_S`.
    on_change
        Called before the stages are placed again (a pending re-cut stops here).
    """

    def __init__(
        self,
        client: Client,
        run: Execution,
        *,
        workers: Callable[[], list[WorkerInfo]],
        times: Callable[[], Sequence[float]],
        written: Callable[[], set[int]],
        say: Callable[[str], None],
        needs: Callable[[], Sequence[int] | None] = lambda: None,
        batch_size: int = 1,
        grace_s: float | None = None,
        wait_s: float | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.client, self.run, self.say = client, run, say
        self.workers, self.times, self.written, self.needs = workers, times, written, needs
        self.batch_size = batch_size
        self.grace_s = RESTART_GRACE_S if grace_s is None else grace_s
        self.wait_s = RESTART_WAIT_S if wait_s is None else wait_s
        self.on_change = on_change
        self.records: list[Recovery] = []

    def _present(self) -> list[str]:
        info = scheduler_workers(self.client)
        labelled = [a for a, r in info.items() if float((r.get("resources") or {}).get(DEVICE_RESOURCE, 0))]
        return sorted(labelled or info)

    def check(self) -> None:
        """Raise :class:`WorkersChanged` when a stage's worker is gone; take in workers that joined.

        Workers that join change nothing for the chunks in flight: the stages are placed
        again over every worker for the chunks submitted from now on, beside the runtime
        the chunks in flight finish on.
        """
        lost, joined = _changed(self.run.placement.workers, self._present())
        if lost:
            raise WorkersChanged(lost)
        if joined:
            self._place(self.workers(), start=time.monotonic(), lost=(), in_flight=[], release=False)

    def _wait_for_workers(self, before: int) -> list[WorkerInfo]:
        """The workers once ``before`` are back, or after the grace with enough for a stage each."""
        stages = self.run.placement.num_stages
        start = time.monotonic()
        while True:
            present = self._present()
            waited = time.monotonic() - start
            if len(present) >= before or (len(present) >= stages and waited >= self.grace_s):
                return self.workers()
            if waited >= self.wait_s:
                return self.workers()
            time.sleep(0.25)

    def recover(self, changed: WorkersChanged, in_flight: list[int]) -> list[int]:
        """Place the stages again and return the chunks of ``in_flight`` to submit again.

        Raises
        ------
        WorkersLostError
            When fewer workers than stages are left after waiting: one line with what was
            lost, what is written, and how to resume.
        """
        start = time.monotonic()
        before = self.run.placement
        held = before.stages_on()
        if changed.lost:
            named = ", ".join(f"{w} (stage {', '.join(map(str, held.get(w, ())))})" for w in changed.lost)
            self.say(
                f"lost worker(s) {named}: {len(in_flight)} chunk(s) in flight were cancelled; "
                "placing the stages again on the workers present"
            )
        workers = self._wait_for_workers(len(before.workers))
        return self._place(workers, start=start, lost=changed.lost, in_flight=in_flight, release=True)

    def _place(
        self,
        workers: list[WorkerInfo],
        *,
        start: float,
        lost: Sequence[str],
        in_flight: list[int],
        release: bool,
    ) -> list[int]:
        """Place the stages on ``workers``, load them, and return the chunks of ``in_flight`` not written."""
        self.on_change()
        before = self.run.placement
        done = self.written()
        try:
            after = on_workers(before, workers, self.times(), needs=self.needs(), batch_size=self.batch_size)
        except PlacementError as exc:
            raise WorkersLostError(
                f"{exc} after losing {', '.join(lost)}; {len(done)} chunk(s) are written and "
                "recorded: rerun the same command with --resume once the cluster has enough workers"
            ) from None
        gone, joined = _changed(before.workers, after.workers)
        if release:
            # The old runtimes' chunks were all cancelled: free their stages before loading the new ones.
            self.run.release(self.client)
        self.run.placement = after
        self.run.spec = replace(self.run.spec, stage_map=tuple(after.stages_on().items()))
        self.run.register(self.client)
        self.run.last_start = time.perf_counter()
        again = [i for i in in_flight if i not in done]
        record = Recovery(
            lost=tuple(lost) or gone,
            joined=joined,
            written_before=len(done),
            resubmitted=tuple(again),
            seconds=time.monotonic() - start,
            placement_after=after.to_dict(),
        )
        self.records.append(record)
        what = f"{len(again)} chunk(s) submitted again" if release else f"{', '.join(joined)} joined"
        self.say(
            f"stages placed again in {record.seconds:.1f} s; {what}, {len(done)} already written are kept\n"
            f"{after.describe()}"
        )
        return again
