"""What moving an activation between two workers costs: measured on the cluster, for the cut.

A pipeline's cut sends every chunk's activation from one stage's worker to the next. Dask
times each transfer a worker receives (``transfer_incoming_log``); a few transfers of a
known size give the seconds per byte between two workers, which the time balance charges
to the stages beside each candidate cut (:func:`dask_infer.partition.partition_model`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from distributed import Client

__all__ = ["transfer_seconds_per_byte"]

_PROBE_BYTES = 8 << 20


def _probe_bytes(nbytes: int, salt: int) -> np.ndarray:
    """``nbytes`` of ones (``salt`` makes each call a task of its own)."""
    return np.ones(nbytes, dtype=np.uint8)


def _size(data: np.ndarray) -> int:
    return int(data.nbytes)


def _incoming(dask_worker: Any) -> list[dict[str, Any]]:
    return [
        {"who": e["who"], "total": e["total"], "duration": e["duration"]}
        for e in list(dask_worker.transfer_incoming_log)
    ]


def transfer_seconds_per_byte(
    client: Client, source: str, dest: str, *, nbytes: int = _PROBE_BYTES, repeats: int = 3
) -> float:
    """Seconds per byte moving data from worker ``source`` to worker ``dest`` (the fastest of ``repeats``).

    0.0 when the two are the same worker or no transfer was recorded.
    """
    if source == dest:
        return 0.0
    for r in range(repeats):
        data = client.submit(_probe_bytes, nbytes, r, workers=[source], allow_other_workers=False, pure=False)
        client.submit(_size, data, workers=[dest], allow_other_workers=False, pure=False).result()
        del data
    log = client.run(_incoming, workers=[dest]).get(dest, [])
    rates = [e["duration"] / e["total"] for e in log if e["who"] == source and e["total"] >= nbytes]
    return min(rates[-repeats:]) if rates else 0.0
