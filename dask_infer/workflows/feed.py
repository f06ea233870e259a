"""Feeding chunks to the cluster: all at once, or through a bounded window; cancel on failure.

Data-parallel runs submit every chunk at once and let Dask order them. A pipeline is fed
through a window, one chunk submitted per chunk written, so the chunks in flight (and
the activations held between stages) stay bounded however long the dataset. If a chunk
fails or the wait is interrupted, every chunk still running is cancelled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from distributed import Future, as_completed

from dask_infer.workflows.monitor import in_notebook
from dask_infer.workflows.placement import Placement

__all__ = ["feed", "min_chunks", "track", "wave", "window"]


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


def track(
    futures: Sequence[Future],
    *,
    progress: bool,
    on_done: Callable[[int], None],
    refill: Callable[[], list[Future]] | None = None,
) -> None:
    """Wait for ``futures``, calling ``on_done(result)`` for each as it finishes.

    ``refill``, when given, is called after each finished future and returns futures
    to wait for as well (the next chunks of a pipeline fed in a window). If a future
    fails or the wait is interrupted, every future still running is cancelled.

    In a Jupyter kernel with ``progress`` set, ``distributed.progress`` also draws its
    per-task-group widget (read, each stage, write) for the futures known at the start;
    without ipywidgets it is skipped.
    """
    if progress and in_notebook():
        with contextlib.suppress(ImportError):
            from distributed import progress as dask_progress

            dask_progress(futures, notebook=True)
    # Only the futures still running are kept: a long pipeline run must not hold on to
    # (and keep the scheduler holding) every chunk it has written.
    live = set(futures)
    waiting = as_completed(futures)
    try:
        for future in waiting:
            live.discard(future)
            on_done(future.result())
            if refill is not None:
                for more in refill():
                    live.add(more)
                    waiting.add(more)
    except BaseException:
        # A failed chunk or an interrupt: stop the rest, so no task outlives the run's
        # runtime on the workers (what was written stays, marked incomplete).
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
    progress, on_done
        As for :func:`track`.
    after_write
        Pipelines only: called after each written chunk with the number written and
        the number not yet submitted (a re-cut judges and switches here), before the
        next chunk is submitted.
    """
    if not indices:
        return
    if not placement.pipelined:
        track(submit(list(indices)), progress=progress, on_done=on_done)
        return
    size = min(window(placement), len(indices))
    pending = list(indices[size:])
    written = 0

    def refill() -> list[Future]:
        nonlocal written
        written += 1
        if after_write is not None:
            after_write(written, len(pending))
        return submit([pending.pop(0)]) if pending else []

    track(submit(list(indices[:size])), progress=progress, on_done=on_done, refill=refill)
