"""Which cluster a run gets: the local cluster by what the machine has, or a scheduler by file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributed import LocalCluster

from dask_infer.errors import DaskInferError
from dask_infer.workflows import cluster as cluster_module
from dask_infer.workflows.cluster import choose_local_cluster, make_client


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Pretend the machine has ``gpus`` CUDA devices and ``cores`` CPU cores."""

    def set_machine(gpus: int, cores: int) -> None:
        monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: gpus)
        monkeypatch.setattr(cluster_module, "usable_cores", lambda: cores)

    return set_machine


def test_cpu_machine_gets_one_worker_whose_torch_has_every_core(machine) -> None:  # type: ignore[no-untyped-def]
    machine(gpus=0, cores=8)
    choice = choose_local_cluster()
    assert (choice.kind, choice.n_workers, choice.threads_per_worker, choice.torch_threads) == (
        "LocalCluster",
        1,
        3,
        8,
    )
    two = choose_local_cluster(n_workers=2, threads_per_worker=1)
    assert (two.n_workers, two.threads_per_worker, two.torch_threads) == (2, 1, 4)


def test_gpu_machine_gets_one_worker_per_gpu(machine) -> None:  # type: ignore[no-untyped-def]
    machine(gpus=4, cores=64)
    choice = choose_local_cluster()
    assert (choice.kind, choice.n_workers, choice.threads_per_worker, choice.torch_threads) == (
        "LocalCUDACluster",
        4,
        16,
        None,
    )
    assert choose_local_cluster(device="cpu").kind == "LocalCluster"


def test_cuda_without_a_gpu_is_one_line(machine) -> None:  # type: ignore[no-untyped-def]
    machine(gpus=0, cores=2)
    with pytest.raises(DaskInferError, match="device='cuda' but no CUDA device is visible; use --device cpu"):
        choose_local_cluster(device="cuda")
    with pytest.raises(DaskInferError, match="device='tpu' is not one of auto, cpu, cuda"):
        choose_local_cluster(device="tpu")


def test_this_machine_picks_what_it_has() -> None:
    """No monkeypatching: on a machine without CUDA the default is a CPU LocalCluster."""
    choice = choose_local_cluster()
    if cluster_module.cuda_device_count() == 0:
        assert choice.kind == "LocalCluster" and choice.torch_threads == cluster_module.usable_cores()
    else:
        assert choice.kind == "LocalCUDACluster"


def test_connects_by_scheduler_file(tmp_path: Path) -> None:
    path = tmp_path / "scheduler.json"
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address=":0",
        scheduler_kwargs={"scheduler_file": str(path)},
    ) as cluster:
        assert json.loads(path.read_text())["address"] == cluster.scheduler_address
        client, choice = make_client(scheduler_file=str(path))
        try:
            assert choice is None and client.scheduler.address == cluster.scheduler_address
        finally:
            client.close()


def test_missing_scheduler_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(DaskInferError, match=rf"scheduler file '{missing}' does not exist"):
        make_client(scheduler_file=str(missing))
