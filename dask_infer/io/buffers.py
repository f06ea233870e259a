"""A per-process pool of reusable (pinned, where CUDA is present) host buffers.

Read tasks decode chunks into leased buffers instead of fresh allocations, so a GPU
worker copies to the device from page-locked memory without a ``pin_memory()`` per
chunk. A lease goes back to the pool when the array handed out is garbage
collected, that is when Dask and the infer task have both dropped it; a leased
buffer is therefore never reused while anything can still read it.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["HostBufferPool", "PoolStats", "host_pool"]


@dataclass(frozen=True)
class PoolStats:
    """Leases served from the pool (``reused``), newly allocated, and refused (over capacity)."""

    reused: int
    allocated: int
    overflow: int


class HostBufferPool:
    """Hands out numpy arrays backed by reusable host buffers.

    Parameters
    ----------
    capacity
        Most buffers kept. A lease of a new size replaces a free buffer of another
        size (an earlier run's chunk size); with every buffer leased it falls back to an
        ordinary array, so a read never blocks on the pool.
    pinned
        Allocate page-locked memory (only meaningful with CUDA).
    max_bytes
        Most bytes the pool's buffers may hold together (``None``: no bound). The pool's
        memory counts against a Dask worker's ``memory_limit`` as unmanaged memory.
    """

    def __init__(self, capacity: int = 8, *, pinned: bool = False, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.pinned = pinned
        self.max_bytes = max_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._bytes = 0
        self._count = 0
        self._lock = threading.Lock()
        self._reused = self._allocated = self._overflow = 0

    def lease(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` on a pooled buffer."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                buffer = free.pop()
                self._reused += 1
            elif self._room(nbytes):
                buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
                self._count += 1
                self._bytes += nbytes
                self._allocated += 1
            else:
                self._overflow += 1
                return np.empty(shape, dtype=dt)
        array = buffer.numpy().view(dt).reshape(shape)
        weakref.finalize(array, self._give_back, nbytes, buffer)
        return array

    def _room(self, nbytes: int) -> bool:
        """Whether a new buffer of ``nbytes`` fits, after dropping free ones if need be; hold the lock."""
        while self._count >= self.capacity or (
            self.max_bytes is not None and self._bytes + nbytes > self.max_bytes
        ):
            if not self._evict_one_free():
                return False
        return True

    def _evict_one_free(self) -> bool:
        """Drop one free buffer of another size (a chunk size no longer in use); hold the lock."""
        for size, free in self._free.items():
            if free:
                free.pop()
                if not free:
                    del self._free[size]
                self._count -= 1
                self._bytes -= size
                return True
        return False

    def _give_back(self, nbytes: int, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(nbytes, []).append(buffer)

    def stats(self) -> PoolStats:
        """Counts since the pool was made."""
        with self._lock:
            return PoolStats(self._reused, self._allocated, self._overflow)


_POOL: HostBufferPool | None = None
_POOL_LOCK = threading.Lock()


_POOL_SHARE = 8
"""A Dask worker's pool holds at most this share of its memory_limit."""

_SPARE_BUFFERS = 4
"""Buffers beyond one per worker thread: chunks waiting for the model or in its hands."""


def _worker_limits() -> tuple[int, int | None]:
    """Buffers and bytes this process's pool may hold.

    In a Dask worker every thread may be decoding a chunk while others wait for the
    model, so the pool holds one buffer per thread and a few spare: a read that finds
    none free would decode into ordinary memory, which a GPU worker must then copy
    through a staging buffer. Bytes are bounded by 1/8 of the worker's ``memory_limit``.
    Outside a worker: 8 buffers, no byte bound.
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 8, None
    limit = worker.memory_manager.memory_limit
    return worker.state.nthreads + _SPARE_BUFFERS, int(limit) // _POOL_SHARE if limit else None


def host_pool() -> HostBufferPool:
    """This process's pool: pinned when CUDA is available."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            capacity, max_bytes = _worker_limits()
            _POOL = HostBufferPool(capacity=capacity, pinned=torch.cuda.is_available(), max_bytes=max_bytes)
        return _POOL
