"""More local workers than GPUs: worker processes share the GPUs round-robin, each seeing its own first."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray as xr
import zarr
from distributed import Client

import dask_infer
from dask_infer.workflows import cluster as cluster_module
from dask_infer.workflows.cluster import choose_local_cluster
from dask_infer.workflows.gpu_sharing import GPUSharingCluster, visible_devices, worker_devices
from tests.reference import assert_close_logits, reference_logits


def test_each_worker_sees_its_gpu_first() -> None:
    devices = ["0", "1", "2"]
    assert [worker_devices(i, devices) for i in range(5)] == ["0,1,2", "1,2,0", "2,0,1", "0,1,2", "1,2,0"]
    assert worker_devices(3, ["GPU-a1"]) == "GPU-a1"


def test_visible_devices_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices(2) == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_devices(2) == ["3", "5"]


def test_more_workers_than_gpus_share_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(cluster_module, "usable_cores", lambda: 16)
    two = choose_local_cluster(n_workers=2)
    assert (two.kind, two.n_workers, two.threads_per_worker, two.torch_threads, two.shared_gpus) == (
        "LocalCluster",
        2,
        8,
        None,
        1,
    )
    assert two.describe() == "LocalCluster: 2 worker(s) sharing 1 GPU(s) x 8 thread(s)"
    one = choose_local_cluster()
    assert (one.kind, one.n_workers, one.threads_per_worker, one.shared_gpus) == (
        "LocalCUDACluster",
        1,
        16,
        0,
    )
    monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: 4)
    assert choose_local_cluster(n_workers=4).kind == "LocalCUDACluster"
    eight = choose_local_cluster(n_workers=8, threads_per_worker=2)
    assert (eight.kind, eight.threads_per_worker, eight.shared_gpus) == ("LocalCluster", 2, 4)


def test_workers_keep_their_gpu_across_a_restart() -> None:
    """Three nanny-managed workers on two GPUs: each process's CUDA_VISIBLE_DEVICES starts at its GPU,
    and a restarted worker (its nanny starts a new process) keeps it."""

    def devices(client: Client) -> list[str]:
        return sorted(client.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"]).values())

    with (
        GPUSharingCluster(
            n_workers=3,
            devices=["0", "1"],
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=":0",
            memory_limit="1GB",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(3, timeout=60)
        assert devices(client) == ["0,1", "0,1", "1,0"]
        client.restart(wait_for_workers=True)
        assert devices(client) == ["0,1", "0,1", "1,0"]


@pytest.mark.parametrize(
    ("layout", "cluster", "mode"),
    [
        ({"n_workers": 2}, "LocalCluster: 2 worker(s) sharing 1 GPU(s) x 1 thread(s)", "data"),
        ({"stages": 2, "placement": "pipeline"}, "LocalCluster: 2 worker(s) sharing 1 GPU(s)", "pipeline"),
    ],
    ids=["two-workers", "two-stage-pipeline"],
)
def test_more_workers_than_gpus_share_them_and_match_plain_pytorch(
    monkeypatch: pytest.MonkeyPatch,
    small_dataset: Path,
    small_weights: Path,
    tmp_path: Path,
    layout: dict[str, object],
    cluster: str,
    mode: str,
) -> None:
    """On a machine taken for one GPU, without a cluster: ``n_workers=2``, or a 2-stage pipeline (which
    asks for two workers; ``LocalCUDACluster`` would refuse a second), starts the sharing cluster,
    and the logits are a plain forward's (the workers, without CUDA, run on the CPU)."""
    monkeypatch.setattr(cluster_module, "cuda_device_count", lambda: 1)
    out = tmp_path / "out.zarr"
    summary = dask_infer.run(
        str(small_dataset),
        str(out),
        model="resnet18",
        weights=str(small_weights),
        threads_per_worker=1,
        chunk_size=16,
        progress=False,
        echo=None,
        **layout,  # type: ignore[arg-type]
    )
    assert summary.cluster.startswith(cluster)
    assert summary.workers == 2
    assert summary.placement["mode"] == mode
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(
        xr.open_zarr(out)["logits"].values, reference_logits(images, "resnet18", str(small_weights))
    )
