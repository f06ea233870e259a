"""Watching a run: progress, per-stage busy time and throughput, GPU use, reports.

Stage timings are kept by each worker's runtime and gathered at the end with
``client.run``; GPU utilisation and memory are sampled on the workers through NVML
(``nvidia-ml-py``, the ``gpu`` extra) and skipped where there is no GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from distributed import Client, Future, as_completed

__all__ = [
    "GpuSampler",
    "format_stages",
    "gpu_summary",
    "in_notebook",
    "maybe_performance_report",
    "stage_summary",
    "track",
    "write_summary",
]


def _nvml_index() -> int | str:
    """This process's GPU as NVML numbers it: the first of CUDA_VISIBLE_DEVICES, which dask-cuda sets."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.isdigit():
        return int(visible)
    return visible or 0


class GpuSampler:
    """Samples one GPU's utilisation and memory in a daemon thread, via NVML.

    Starts only where NVML and a GPU are present; elsewhere :meth:`stats` returns ``None``.

    Parameters
    ----------
    interval
        Seconds between samples.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._samples: list[tuple[float, int]] = []
        self._total = 0
        self._name = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None

    def start(self) -> bool:
        """Start sampling; return whether NVML found the GPU."""
        try:
            import pynvml

            pynvml.nvmlInit()
            index = _nvml_index()
            if isinstance(index, int):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            else:
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(index)
            self._total = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self._name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            self._handle = None
            return False
        self._thread = threading.Thread(target=self._loop, name="dask-infer-nvml", daemon=True)
        self._thread.start()
        return True

    def _loop(self) -> None:
        import pynvml

        while not self._stop.wait(self.interval):
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                used = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            except Exception:
                return
            self._samples.append((float(util), int(used)))

    def stop(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)

    def stats(self) -> dict[str, Any] | None:
        """Mean and peak utilisation (%) and peak memory used, or ``None`` without NVML."""
        if self._handle is None:
            return None
        samples = list(self._samples)
        utils = [u for u, _ in samples]
        return {
            "gpu": self._name,
            "samples": len(samples),
            "utilization_mean_pct": sum(utils) / len(utils) if utils else None,
            "utilization_peak_pct": max(utils) if utils else None,
            "memory_peak_bytes": max((m for _, m in samples), default=None),
            "memory_total_bytes": self._total,
        }


def stage_summary(
    stats: Mapping[str, Mapping[str, Any]], seconds: float, num_stages: int
) -> list[dict[str, Any]]:
    """Per-stage busy time, images and throughput over every worker.

    Parameters
    ----------
    stats
        Worker address -> its runtime's ``stats()``.
    seconds
        Wall time of the run.
    num_stages
        Number of stages.

    Returns
    -------
    list of dict
        One per stage: workers, images, busy seconds (wall time, summed), work seconds
        (CPU time on a CPU, which other processes on the same cores do not inflate),
        mean busy fraction of its workers over the run, seconds per image (busy and
        work), images/s while busy and images/s over the run.
    """
    out = []
    for k in range(num_stages):
        busy = work = images = 0.0
        workers = []
        for address, s in stats.items():
            stage = s.get("stages", {}).get(k)
            if stage and stage["images"]:
                busy += stage["busy_s"]
                work += stage.get("work_s", stage["busy_s"])
                images += stage["images"]
                workers.append(address)
        out.append(
            {
                "stage": k,
                "workers": sorted(workers),
                "images": int(images),
                "busy_s": busy,
                "work_s": work,
                "busy_fraction": busy / (seconds * len(workers)) if workers and seconds > 0 else 0.0,
                "seconds_per_image": busy / images if images else None,
                "work_seconds_per_image": work / images if images else None,
                "images_per_s_busy": images / busy if busy > 0 else None,
                "images_per_s": images / seconds if seconds > 0 else None,
            }
        )
    return out


def gpu_summary(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Worker address -> NVML statistics, for workers that have a GPU."""
    return {address: s["gpu"] for address, s in sorted(stats.items()) if s.get("gpu")}


def format_stages(stages: Sequence[Mapping[str, Any]]) -> str:
    """One line per stage: busy time, busy fraction and throughput."""
    lines = []
    for s in stages:
        if not s["images"]:
            continue
        lines.append(
            f"  stage {s['stage']}: {s['busy_s']:.2f} s busy on {len(s['workers'])} worker(s) "
            f"({100 * s['busy_fraction']:.0f}%), {s['images_per_s_busy']:.1f} images/s while busy"
        )
    return "\n".join(lines)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where ``distributed.progress`` draws a widget)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


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


@contextlib.contextmanager
def maybe_performance_report(client: Client, filename: str | None) -> Iterator[None]:
    """``distributed.performance_report`` into ``filename`` on ``client``, or nothing if ``None``."""
    if filename is None:
        yield
        return
    from distributed import performance_report

    Path(filename).parent.mkdir(parents=True, exist_ok=True)
    with client.as_current(), performance_report(filename=str(filename)):
        yield


def write_summary(path: str, summary: Mapping[str, Any]) -> None:
    """Write ``summary`` as indented JSON to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=2, default=str) + "\n")
