"""Several local worker processes per GPU, each seeing its GPU first.

One worker process per GPU runs its decoding threads, its uploads and its kernel launches
under one interpreter lock. Two processes on the one card each hold their own, so one
decodes while the other launches; the card interleaves their kernels. ``LocalCUDACluster``
names its workers by device and starts at most one per GPU; :class:`GPUSharingCluster` is
a ``LocalCluster`` whose worker ``i`` gets ``CUDA_VISIBLE_DEVICES`` rotated to start at
GPU ``i mod G``, as ``LocalCUDACluster`` does for its one worker per GPU.
"""

from __future__ import annotations

import os
from typing import Any

from distributed import LocalCluster

__all__ = ["GPUSharingCluster", "visible_devices", "worker_devices"]


def visible_devices(count: int) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` where it is set, else ``0..count-1``."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if given:
        return [d.strip() for d in given.split(",") if d.strip()]
    return [str(i) for i in range(count)]


def worker_devices(index: int, devices: list[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` for local worker ``index``: ``devices`` rotated to its GPU.

    Worker ``index`` runs on ``devices[index mod len(devices)]``, its ``cuda:0``.
    """
    start = index % len(devices)
    return ",".join(devices[start:] + devices[:start])


class GPUSharingCluster(LocalCluster):
    """A ``LocalCluster`` of nanny-managed workers spread round-robin over ``devices``.

    Parameters
    ----------
    n_workers
        Worker processes; worker ``i`` sees ``devices[i mod len(devices)]`` as its ``cuda:0``.
    devices
        The GPUs, as ``CUDA_VISIBLE_DEVICES`` names them.
    **kwargs
        ``LocalCluster``'s options (threads, memory limit, host, dashboard address).
    """

    def __init__(self, *, n_workers: int, devices: list[str], **kwargs: Any) -> None:
        if not devices:
            raise ValueError("GPUSharingCluster needs at least one device")
        self._devices = list(devices)
        super().__init__(n_workers=0, processes=True, **kwargs)
        self.scale(n_workers)
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        """The next worker's spec: ``LocalCluster``'s, with its GPUs in the next order."""
        ((name, spec),) = super().new_worker_spec().items()
        options = dict(spec["options"])
        env = dict(options.get("env") or {})
        env["CUDA_VISIBLE_DEVICES"] = worker_devices(len(self.worker_spec), self._devices)
        options["env"] = env
        return {name: {**spec, "options": options}}
