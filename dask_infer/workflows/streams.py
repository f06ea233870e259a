"""How many chunks a GPU worker's model runs at once, each in its own thread and CUDA stream.

One compute thread leaves the card idle between chunks: while the thread copies a chunk's
outputs back, builds its top-k, hands the result to Dask and picks up the next chunk,
nothing is queued on the GPU. With two, one chunk's host-side work overlaps the other's
kernels. Each thread queues its work on a CUDA stream of its own (with its own copy
stream for uploads), so a thread waiting for its outputs waits for its own chunk only.

``DASK_INFER_GPU_STREAMS`` in the workers' environment sets the number (default 1).
Stages replayed as CUDA graphs always run in one thread: torch keeps recorded graphs per
thread, and that thread is the one that recorded them while the stages loaded. So does a
run that taps a feature layer, whose hook holds one chunk's values at a time.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from dask_infer.partition.compress import CompressionPlan
from dask_infer.partition.compress.auto import is_auto
from dask_infer.workflows.stages import RuntimeSpec

__all__ = ["GPU_STREAMS_ENV", "ThreadStreams", "compute_threads", "gpu_streams", "wants_cuda"]

GPU_STREAMS_ENV = "DASK_INFER_GPU_STREAMS"
_MAX_STREAMS = 8


def gpu_streams() -> int:
    """Chunks a GPU worker runs at once: ``DASK_INFER_GPU_STREAMS``, default 1.

    Raises
    ------
    RuntimeError
        The variable is set to anything but a whole number from 1 to 8.
    """
    text = os.environ.get(GPU_STREAMS_ENV, "").strip()
    if not text:
        return 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_STREAMS:
        raise RuntimeError(
            f"{GPU_STREAMS_ENV}={text!r} is not a whole number from 1 to {_MAX_STREAMS}; "
            "unset it or give e.g. 2"
        )
    return value


def wants_cuda(device: str) -> bool:
    """Whether a runtime asked for ``device`` ('cpu', 'cuda' or 'auto') runs on a GPU here."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _replays_graphs(spec: RuntimeSpec) -> bool:
    if spec.compress is None or is_auto(spec.compress):
        return False
    plan = CompressionPlan.coerce(spec.compress)
    return any(plan.recipe_for(i).cuda_graphs for i in range(spec.num_stages))


def compute_threads(spec: RuntimeSpec) -> int:
    """Threads of the runtime's compute executor: :func:`gpu_streams` on a GPU, else 1.

    One where any stage replays CUDA graphs (torch records them per thread), where a
    feature layer is tapped (its hook keeps one chunk's values at a time), and on a CPU,
    whose model already spreads over every core the worker has.
    """
    if not wants_cuda(spec.device) or spec.feature_layer is not None or _replays_graphs(spec):
        return 1
    return gpu_streams()


class ThreadStreams:
    """Each compute thread's own CUDA compute and copy streams, made on first use.

    Parameters
    ----------
    device
        The CUDA device.
    shared
        One compute thread: chunks run on the device's current stream, as torch's own
        code would, with one copy stream beside it.
    """

    def __init__(self, device: torch.device, *, shared: bool) -> None:
        self.device = device
        self.shared = shared
        self._local = threading.local()

    def copy(self) -> torch.cuda.Stream:
        """This thread's stream for host-to-device uploads."""
        stream = getattr(self._local, "copy", None)
        if stream is None:
            stream = self._local.copy = torch.cuda.Stream(self.device)
        return stream

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        """Run the block's kernels (and its waits for them) on this thread's compute stream."""
        if self.shared:
            yield
            return
        stream = getattr(self._local, "compute", None)
        if stream is None:
            stream = self._local.compute = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            yield
