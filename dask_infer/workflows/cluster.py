"""Make or connect a Dask cluster: a GPU machine, a CPU machine, or an address."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from dask_infer.errors import DaskInferError, reason
from dask_infer.options import DEVICES, check_choice

__all__ = [
    "ClusterChoice",
    "check_scheduler_file",
    "choose_local_cluster",
    "cuda_device_count",
    "device_memory",
    "make_client",
]


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without a GPU or without CUDA torch)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def device_memory(device: str = "auto") -> int | None:
    """Total bytes of this process's CUDA device, ``None`` without one (run on each worker)."""
    if device == "cpu":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:
        return None


@dataclass(frozen=True)
class ClusterChoice:
    """The local cluster a run starts: kind, workers, threads, and torch threads per worker."""

    kind: str
    n_workers: int
    threads_per_worker: int
    torch_threads: int | None

    def describe(self) -> str:
        """One line for the run's log."""
        return f"{self.kind}: {self.n_workers} worker(s) x {self.threads_per_worker} thread(s)" + (
            f", torch threads {self.torch_threads}" if self.torch_threads else ""
        )


def choose_local_cluster(
    *, device: str = "auto", n_workers: int | None = None, threads_per_worker: int | None = None
) -> ClusterChoice:
    """Pick the local cluster from what this machine has.

    One ``LocalCUDACluster`` worker per GPU; on a CPU-only machine one worker process
    whose single compute thread gives torch every core, with spare threads for reading
    and writing chunks while the model runs.
    """
    gpus = cuda_device_count() if device in ("auto", "cuda") else 0
    check_choice("device", device, DEVICES)
    if device == "cuda" and gpus == 0:
        raise DaskInferError("device='cuda' but no CUDA device is visible; use --device cpu")
    cores = os.cpu_count() or 1
    if gpus:
        # decoding feeds the GPU: give each worker its share of cores for I/O threads
        io_threads = threads_per_worker or max(4, min(16, cores // gpus))
        return ClusterChoice("LocalCUDACluster", n_workers or gpus, io_threads, None)
    workers = n_workers or 1
    torch_threads = max(1, cores // workers)
    return ClusterChoice("LocalCluster", workers, threads_per_worker or 3, torch_threads)


def worker_environ() -> dict[str, object]:
    """Distributed's worker environment without its fixed ``MALLOC_TRIM_THRESHOLD_``.

    A fixed trim threshold also fixes glibc's mmap threshold, so every large activation
    buffer becomes a fresh mmap with page faults on first touch; torch's CPU allocator
    relies on the dynamic threshold to reuse them.
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    return environ


def check_scheduler_file(path: str) -> None:
    """Raise unless ``path`` is a file a scheduler could have written (checked before any work)."""
    if not Path(path).is_file():
        raise DaskInferError(
            f"scheduler file {path!r} does not exist; give the file that "
            "`dask scheduler --scheduler-file` wrote"
        )


def make_client(
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    device: str = "auto",
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
) -> tuple[Client, ClusterChoice | None]:
    """Connect to ``scheduler`` or ``scheduler_file``, or start the local cluster this machine suits.

    Returns the client and the local cluster choice (``None`` when connected to an
    existing scheduler). Local services listen on 127.0.0.1 only.
    """
    if scheduler_file is not None:
        check_scheduler_file(scheduler_file)
        try:
            return Client(scheduler_file=scheduler_file, timeout="10s"), None
        except (OSError, TimeoutError, ValueError, KeyError) as exc:
            raise DaskInferError(
                f"cannot reach the Dask scheduler named in {scheduler_file!r}: {reason(exc)}"
            ) from exc
    if scheduler is not None:
        try:
            return Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as exc:
            raise DaskInferError(f"cannot reach the Dask scheduler at {scheduler!r}: {exc}") from exc
    choice = choose_local_cluster(device=device, n_workers=n_workers, threads_per_worker=threads_per_worker)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        cluster = _start_cluster(choice)
    return Client(cluster), choice


def _start_cluster(choice: ClusterChoice) -> LocalCluster:
    if choice.kind == "LocalCUDACluster":
        from dask_cuda import LocalCUDACluster

        return LocalCUDACluster(
            n_workers=choice.n_workers,
            threads_per_worker=choice.threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:8787",
        )
    cluster = LocalCluster(
        n_workers=choice.n_workers,
        threads_per_worker=choice.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:8787",
    )
    return cluster
