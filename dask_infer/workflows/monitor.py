"""Watching a run while it happens: GPU use sampled on the workers, dask's performance report.

GPU utilisation and memory are sampled on the workers through NVML (``nvidia-ml-py``,
the ``gpu`` extra) and skipped where there is no GPU. What the run did afterwards
(per-stage figures, the summary) is :mod:`dask_infer.workflows.summary`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distributed import Client

__all__ = ["GpuSampler", "dask_report_path", "in_notebook", "maybe_performance_report"]


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


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where ``distributed.progress`` draws a widget)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def dask_report_path(report: str) -> str:
    """Where dask's performance report goes beside the run report: ``run.html`` -> ``run.dask.html``."""
    path = Path(report)
    return str(path.with_name(f"{path.stem}.dask{path.suffix or '.html'}"))


@contextlib.contextmanager
def maybe_performance_report(client: Client, filename: str | None) -> Iterator[None]:
    """``distributed.performance_report`` on ``client`` beside the run report ``filename``, or nothing.

    Dask's report goes to :func:`dask_report_path` of ``filename``, with BokehJS inline
    (``mode="inline"``), so that it opens offline too; the run report itself is written
    by :func:`dask_infer.workflows.report.report_run`.
    """
    if filename is None:
        yield
        return
    from distributed import performance_report

    Path(filename).parent.mkdir(parents=True, exist_ok=True)
    target = dask_report_path(filename)
    with client.as_current(), performance_report(filename=target, mode="inline"):
        yield
    _drop_outside_icon(Path(target))


_OUTSIDE_ICON = re.compile(
    r"""<link\b[^>]*\brel=["']?(?:shortcut )?icon["']?[^>]*href=["']?https?://[^>]*>\s*""", re.I
)


def _drop_outside_icon(page: Path) -> None:
    """Remove the favicon link to docs.dask.org from dask's report, its one request outside the file."""
    if page.exists():
        text = page.read_text(encoding="utf-8")
        page.write_text(_OUTSIDE_ICON.sub("", text), encoding="utf-8")
