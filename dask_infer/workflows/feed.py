"""Feeding chunks to the cluster: all at once, or through a bounded window; cancel on failure.

Data-parallel runs submit every chunk at once and let Dask order them. A pipeline is fed
through a window, one chunk submitted per chunk written, so the chunks in flight (and
the activations held between stages) stay bounded however long the dataset. If a chunk
fails or the wait is interrupted, every chunk still running is cancelled. A pipeline that
loses a stage's worker cancels its chunks in flight, has its stages re-placed, and
submits again those of them not yet written.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

from distributed import Future, as_completed

from dask_infer.workflows.monitor import in_notebook
from dask_infer.workflows.placement import Placement

__all__ = ["WorkersChanged", "feed", "min_chunks", "track", "wave", "window"]


def wave(placement: Placement) -> int:
    """Chunks to measure a pipeline's stage times on: a few per stage of every replica."""
    return placement.replicas * max(4, placement.num_stages + 1)


def window(placement: Placement) -> int:
    """Chunks a pipeline keeps in flight: two waves, so every stage always has one waiting."""
    return 2 * wave(placement)


def min_chunks(placement: Placement) -> int:
    """Chunks a run is cut into at least, where the data allows.

    A pipeline needs a full window in flight, and as many chunks again after its first
    wave for a re-cut to pay off; data-parallel runs need none beyond the workers'.
    """
    return 2 * window(placement) if placement.pipelined else 0


class WorkersChanged(Exception):
    """The workers a pipeline's stages are placed on are no longer all there.

    Raised by a ``check`` callback of :func:`track` to stop waiting: the chunks in flight
    are cancelled, and :func:`feed` submits them again once the stages are re-placed.
    """

    def __init__(self, lost: Sequence[str]) -> None:
        super().__init__(f"lost worker(s) {', '.join(lost)}")
        self.lost = tuple(lost)


def _wait_ready(waiting: as_completed, seconds: float) -> bool:
    """Wait up to ``seconds`` for a finished future in ``waiting``; whether one is ready."""
    with waiting.thread_condition:
        if not waiting.has_ready():
            waiting.thread_condition.wait(timeout=seconds)
    return waiting.has_ready()


def track(
    futures: list[Future],
    *,
    progress: bool,
    on_done: Callable[[Future], None],
    refill: Callable[[], list[Future]] | None = None,
    check: Callable[[], None] | None = None,
    check_every: float = 1.0,
) -> None:
    """Wait for ``futures``, calling ``on_done(future)`` for each as it finishes.

    No result is fetched: a chunk's write task says all there is to say by finishing.
    ``futures`` is emptied and a finished future is dropped as soon as it is seen, so
    the scheduler forgets its task at once, and a worker lost later does not make it
    compute a written chunk again. (A worker lost in the few milliseconds between
    finishing a write and the scheduler hearing the future dropped still makes it
    recompute that chunk, which writes the same values again.) ``refill``, when given,
    is called after each finished future and returns futures to wait for as well (the
    next chunks of a pipeline fed in a window). ``check``, when given, is called at least
    every ``check_every`` seconds while waiting, and stops the wait by raising
    (:class:`WorkersChanged` when a pipeline lost a stage's worker). If a future fails
    (its exception is raised), the wait is interrupted, or ``check`` raises, every
    future still running is cancelled.

    In a Jupyter kernel with ``progress`` set and every chunk submitted at once (no
    ``refill``), ``distributed.progress`` also draws its per-task-group widget (read,
    model, write), which then counts the whole run; a pipeline fed through a window
    skips it, since it would count only the first window, and the caller's bar of
    images (``on_done``) counts the whole run. Without ipywidgets it is skipped.
    """
    if progress and refill is None and in_notebook():
        with contextlib.suppress(ImportError):
            from distributed import progress as dask_progress

            dask_progress(futures, notebook=True)
    # Only the futures still running are kept: a long pipeline run must not hold on to
    # (and keep the scheduler holding) every chunk it has written.
    live = set(futures)
    waiting = as_completed(futures)
    futures.clear()
    checked = time.monotonic()
    try:
        while not waiting.is_empty():
            if check is not None:
                ready = _wait_ready(waiting, check_every)
                if not ready or time.monotonic() - checked >= check_every:
                    check()
                    checked = time.monotonic()
                if not ready:
                    continue
            future = next(waiting)
            live.discard(future)
            if future.status != "finished":
                future.result()  # raises the task's exception (kept by the scheduler) or CancelledError
            on_done(future)
            del future
            if refill is not None:
                more = refill()
                live.update(more)
                waiting.update(more)
                del more
    except BaseException:
        # A failed chunk, an interrupt or lost workers: stop the rest, so no task outlives
        # the run's runtime on the workers (what was written stays, marked incomplete).
        for future in live:
            future.cancel()
        raise


def feed(
    placement: Placement,
    indices: Sequence[int],
    submit: Callable[[list[int]], list[Future]],
    *,
    progress: bool,
    on_done: Callable[[int], None],
    after_write: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
    recover: Callable[[WorkersChanged, list[int]], list[int]] | None = None,
) -> None:
    """Submit the chunks ``indices`` (those not yet written) and wait for them to be written.

    Parameters
    ----------
    placement
        Data-parallel runs submit every chunk at once; pipelines through :func:`window`.
    indices
        The chunks to compute, in order.
    submit
        Submits the chunks of the given indices and returns their write futures.
    progress
        As for :func:`track`.
    on_done
        Called with the index of each chunk written.
    after_write
        Pipelines only: called after each written chunk with the number written and
        the number not yet submitted (a re-cut judges and switches here), before the
        next chunk is submitted.
    check
        Called about every second while waiting (see :func:`track`); in a pipeline it raises
        :class:`WorkersChanged` when a worker holding a stage is gone.
    recover
        Pipelines only: called with what ``check`` raised and the chunks that were in
        flight (now cancelled); re-places the stages and returns those of the chunks to
        submit again (those not written meanwhile). Without it, the exception propagates.
    """
    if not indices:
        return
    chunk_of: dict[str, int] = {}

    def sent(batch: list[int]) -> list[Future]:
        futures = submit(batch) if batch else []
        chunk_of.update(zip((str(f.key) for f in futures), batch, strict=True))
        return futures

    def finished(future: Future) -> None:
        on_done(chunk_of.pop(str(future.key)))

    if not placement.pipelined:
        track(sent(list(indices)), progress=progress, on_done=finished, check=check)
        return
    pending = deque(indices)
    written = 0

    def send(count: int) -> list[Future]:
        return sent([pending.popleft() for _ in range(min(count, len(pending)))])

    def refill() -> list[Future]:
        nonlocal written
        written += 1
        if after_write is not None:
            after_write(written, len(pending))
        return send(1)

    first = send(window(placement))
    while True:
        try:
            track(
                first,
                progress=progress,
                on_done=finished,
                refill=refill,
                check=check,
            )
            return
        except WorkersChanged as changed:
            if recover is None:
                raise
            in_flight = sorted(chunk_of.values())
            chunk_of.clear()
            again = recover(changed, in_flight)
            pending.extendleft(reversed(again))
            first = send(window(placement))
