"""A model task gives its worker thread back while it runs on its runtime's compute executor.

A worker runs at most as many tasks at once as it has threads, whichever executor runs
them, and the scheduler sends it new chunks' reads by the same count. A model task runs
on its runtime's own compute executor, not on one of those threads; counted against
them, it would leave a one-thread worker (``dask worker --nthreads 1``, dask-cuda's
default) unable to read the next chunk or write the last one while the model runs, and
the reads would come a few at a time, each after a round trip to the scheduler. So each
model task, once running, tells its worker that it has left the thread pool, as
``distributed.secede`` does for a task that waits on others: the task becomes
long-running, which frees its slot for reads and writes (the model tasks waiting for the
compute executor still hold theirs, so the chunks read ahead stay bounded), and is no
longer stolen. Workers of several threads keep one free for reading and writing anyway,
and are left as they are.
"""

from __future__ import annotations

import time

from distributed import get_worker
from distributed.worker import thread_state
from distributed.worker_state_machine import SecedeEvent

__all__ = ["leave_worker_slot"]


def leave_worker_slot() -> None:
    """Tell the worker running this task that the task no longer holds one of its threads.

    Call it first thing in a task body that Dask runs on a runtime's compute executor,
    and only there: the worker must be executing this thread's task. Outside a worker
    task (a body called in-process, in tests), it does nothing.

    Only a worker of one thread is told. One of several threads has another free for
    reads and writes while the model runs; there, a freed slot would only have the
    scheduler send the worker one more chunk than its memory plan counts
    (:func:`~dask_infer.workflows.graph.chunk_target` plans for 8 held at once), which
    took a 2 GB worker reading 1024x1024 images over dask's pause threshold.
    """
    try:
        worker = get_worker()
    except ValueError:
        return
    key = getattr(thread_state, "key", None)
    if key is None or worker.state.nthreads > 1:
        return
    # The event reaches the worker's event loop before the task's result can (both are
    # queued on that loop in order), so the task is still executing when it is handled.
    # No compute duration: the scheduler then keeps its estimate of the task's length
    # from finished tasks, instead of averaging in the instant before this call.
    event = SecedeEvent(
        key=key,
        compute_duration=None,  # type: ignore[arg-type]
        stimulus_id=f"compute-executor-{time.time()}",
    )
    worker.loop.add_callback(worker.handle_stimulus, event)
