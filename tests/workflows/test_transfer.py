"""The activation transfer cost a time-balanced pipeline's cut is charged, measured between two workers."""

from __future__ import annotations

from distributed import Client

from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.transfer import transfer_seconds_per_byte


def test_moving_bytes_between_two_workers_is_timed(client: Client) -> None:
    a, b = sorted(scheduler_workers(client))
    rate = transfer_seconds_per_byte(client, a, b, nbytes=4 << 20)
    # Between two processes on one host: well under a microsecond a byte (1 MB/s), above zero.
    assert 0 < rate < 1e-6
    assert transfer_seconds_per_byte(client, a, a) == 0.0
    # Nothing of the probe stays on the cluster.
    assert not client.run(lambda dask_worker: [k for k in dask_worker.data if "probe_bytes" in str(k)])[a]
