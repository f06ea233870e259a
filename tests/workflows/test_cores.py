"""Cores a process may use: its affinity mask and its cgroup quota, not the machine's count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dask_infer.workflows import cores as cores_module
from dask_infer.workflows.cores import usable_cores


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (8, "max 100000\n", 8),  # no quota
        (8, "200000 100000\n", 2),  # docker --cpus 2
        (8, "150000 100000\n", 2),  # 1.5 cores: rounded up
        (8, "50000 100000\n", 1),
        (2, "800000 100000\n", 2),  # the affinity mask is the smaller
        (4, "not a quota\n", 4),  # unreadable: the mask alone
        (4, None, 4),  # no cgroup v2 file
    ],
)
def test_the_smaller_of_the_affinity_mask_and_the_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, affinity: int, cpu_max: str | None, expected: int
) -> None:
    monkeypatch.setattr(cores_module.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert usable_cores(path) == expected


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="affinity masks are Linux's")
def test_a_process_pinned_to_one_core_gets_one_torch_thread() -> None:
    """Like ``taskset -c 0``: the local CPU cluster gives torch one thread, not one per machine core."""
    code = (
        "from dask_infer.workflows.cores import usable_cores;"
        "from dask_infer.workflows.cluster import choose_local_cluster;"
        "print(usable_cores(), choose_local_cluster(device='cpu').torch_threads)"
    )
    first = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {first}),
    )
    assert out.stdout.split() == ["1", "1"]


def test_a_callers_worker_with_more_threads_than_cores_gives_torch_its_cores(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """On a cluster the caller made, a CPU worker of more threads than usable cores runs torch on
    as many threads as it has cores, not one per Dask thread."""
    import torch
    from distributed import Client, LocalCluster

    from tests.reference import run_small

    threads = usable_cores() + 2
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=threads, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        run_small(client, small_dataset, tmp_path / "out.zarr", small_weights, chunk_size=64)
        cores = client.run(usable_cores)
        torch_threads = client.run(torch.get_num_threads)
    assert list(torch_threads.values()) == list(cores.values())
