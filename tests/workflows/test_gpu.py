"""GPU checks: pinned buffers, the copy-stream runtime, and a LocalCUDACluster run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from dask_infer.io.buffers import HostBufferPool
from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from tests.reference import assert_close_logits, assert_held_out_mistakes, reference_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _cuda_spec(weights: Path, compress: str | None = None) -> RuntimeSpec:
    """The random 10-class ResNet-18 on the GPU, batches of 48, logits only."""
    from dask_infer.models.registry import build_model

    loaded = build_model("resnet18", weights=str(weights))
    return RuntimeSpec(
        model="resnet18",
        weights=str(weights),
        num_classes=10,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        outputs=("logits",),
        top_k=5,
        batch_size=48,
        device="cuda",
        compress=compress,
    )


def _bf16_digits_run(weights: Path) -> dict[str, Any]:
    """``dask_infer.run`` options of the trained digits model in bf16, chunks of 32, quietly."""
    return {
        "model": "resnet18",
        "weights": str(weights),
        "compress": "bf16+channels_last",
        "chunk_size": 32,
        "batch_size": 16,
        "progress": False,
        "echo": None,
    }


def test_pool_leases_pinned_memory() -> None:
    arr = HostBufferPool(capacity=2, pinned=True).lease((8, 32, 32, 3), "uint8")
    assert torch.from_numpy(arr).is_pinned()


def test_cuda_runtime_matches_cpu(small_dataset: Path, small_weights: Path) -> None:
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    runtime = ModelRuntime(_cuda_spec(small_weights), "gpu-test")
    runtime.load()
    got = runtime.forward(images).cpu().numpy()
    want = reference_logits(images, "resnet18", str(small_weights))
    # fp32 on the GPU, where cuDNN runs convolutions in TF32 (10-bit mantissa) by default:
    # 1.3e-3 of the largest logit measured on an H100, 5e-3 allowed.
    assert_close_logits(got, want, rel=5e-3)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 320 digits at 32x32 (gray), chunks of 32, with ``label`` and ``held_out``."""
    from dask_infer.io.samples import write_sample

    path = tmp_path_factory.mktemp("digits") / "digits.zarr"
    write_sample(str(path), kind="digits", size=32, count=320, chunk=32)
    return path


def test_local_cuda_cluster_run(digits_store: Path, digits_weights: Path, tmp_path: Path) -> None:
    """bf16 + channels-last on the trained digits model: within bf16 rounding of fp32 PyTorch
    on the CPU, and the same held-out accuracy."""
    import xarray as xr

    import dask_infer

    summary = dask_infer.run(
        str(digits_store),
        str(tmp_path / "o.zarr"),
        model="resnet18",
        weights=str(digits_weights),
        compress="bf16+channels_last",
        progress=False,
        echo=None,
    )
    assert summary.cluster.startswith("LocalCUDACluster")
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    want = reference_logits(images, "resnet18", str(digits_weights))
    ds = xr.open_zarr(tmp_path / "o.zarr")
    got = ds["logits"].values
    # bf16 keeps 8 bits of mantissa: 0.6% of the largest logit measured on an H100, 2% allowed.
    assert_close_logits(got, want, rel=2e-2)
    # A trained model's top-1 survives bf16: at most 1 of the 320 digits (99.5%) may differ.
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.995
    # The fp32 model misses at most 3 of the 78 held-out digits; bf16 at most 2 more (none seen on an H100).
    assert_held_out_mistakes(ds, got, want, held_out=78)


def test_two_stages_share_one_gpu(digits_store: Path, digits_weights: Path, tmp_path: Path) -> None:
    """Two workers on the one GPU, one stage each: the same predictions as the whole model."""
    import xarray as xr
    from distributed import Client, LocalCluster

    import dask_infer

    common = {"model": "resnet18", "weights": str(digits_weights), "progress": False, "echo": None}
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        whole = dask_infer.run(str(digits_store), str(tmp_path / "whole.zarr"), client=client, **common)
        piped = dask_infer.run(
            str(digits_store),
            str(tmp_path / "piped.zarr"),
            client=client,
            stages=2,
            placement="pipeline",
            rebalance=False,
            **common,
        )
    assert whole.gpus and piped.placement["mode"] == "pipeline"
    assert sorted(map(tuple, piped.loaded_stages.values())) == [(0,), (1,)]
    a = xr.open_zarr(tmp_path / "whole.zarr")["logits"].values
    b = xr.open_zarr(tmp_path / "piped.zarr")["logits"].values
    # Each stage runs the same batches on the same card as the whole model: fp32 (TF32
    # convolutions) agree to rounding, and every image gets the same class.
    assert_close_logits(b, a, rel=1e-4)
    assert (a.argmax(1) == b.argmax(1)).all()


def test_cuda_graph_stages_pad_the_last_batch(small_dataset: Path, small_weights: Path) -> None:
    """bf16 + CUDA graphs: one compiled batch size (the chunk's last, smaller batch is padded),
    outputs within bf16 rounding of fp32 on the CPU."""
    from torch._dynamo.utils import counters

    images = zarr.open_group(str(small_dataset), mode="r")["images"][:100]
    runtime = ModelRuntime(
        _cuda_spec(small_weights, compress="bf16+channels_last+cudagraphs"), "gpu-graphs-test"
    )
    runtime.load()
    compiled = counters["stats"]["unique_graphs"]
    first = runtime.forward(images).cpu().numpy()  # batches of 48, 48 and 4
    again = runtime.forward(images).cpu().numpy()
    assert counters["stats"]["unique_graphs"] == compiled
    want = reference_logits(images, "resnet18", str(small_weights))
    assert_close_logits(first, want, rel=3e-2)
    np.testing.assert_array_equal(first, again)


def test_two_cuda_streams_give_the_same_outputs(
    digits_store: Path, digits_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DASK_INFER_GPU_STREAMS=2: two chunks at once on the card, each in its own thread and
    stream; the outputs are those of one stream, and within bf16 rounding of fp32 on the CPU."""
    import xarray as xr

    import dask_infer
    from dask_infer.workflows.cluster import make_client
    from dask_infer.workflows.streams import GPU_STREAMS_ENV

    common = _bf16_digits_run(digits_weights)
    one = dask_infer.run(str(digits_store), str(tmp_path / "one.zarr"), **common)
    monkeypatch.setenv(GPU_STREAMS_ENV, "2")
    client, _ = make_client()
    try:
        assert type(client.cluster).__name__ == "LocalCUDACluster"
        dask_infer.run(str(digits_store), str(tmp_path / "two.zarr"), client=client, **common)

        def compute_threads(dask_worker: Any) -> list[int]:
            return [e._max_workers for n, e in dask_worker.executors.items() if n.endswith("-compute")]

        threads = client.run(compute_threads)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert one.cluster.startswith("LocalCUDACluster")
    assert [2] in threads.values()
    a = xr.open_zarr(tmp_path / "one.zarr")["logits"].values
    b = xr.open_zarr(tmp_path / "two.zarr")["logits"].values
    # The same kernels on the same batches, queued on other streams: equal to rounding.
    assert_close_logits(b, a, rel=1e-3)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.995
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    assert_close_logits(b, reference_logits(images, "resnet18", str(digits_weights)), rel=2e-2)


def test_two_worker_processes_share_the_card(
    digits_store: Path, digits_weights: Path, tmp_path: Path
) -> None:
    """``n_workers=2`` on a one-GPU machine: two worker processes on the one card, both running
    chunks on CUDA; the outputs are one worker's, and within bf16 rounding of fp32 on the CPU."""
    import xarray as xr

    import dask_infer

    if torch.cuda.device_count() != 1:
        pytest.skip("two workers on one card: a machine with one GPU")
    common = _bf16_digits_run(digits_weights)
    one = dask_infer.run(str(digits_store), str(tmp_path / "one.zarr"), **common)
    two = dask_infer.run(str(digits_store), str(tmp_path / "two.zarr"), n_workers=2, **common)
    assert one.cluster.startswith("LocalCUDACluster: 1 worker")
    assert two.cluster.startswith("LocalCluster: 2 worker(s) sharing 1 GPU(s)")
    # both processes ran on the card (NVML monitored each worker's device)
    assert two.workers == 2 and len(two.gpus) == 2, (two.workers, two.gpus)
    a = xr.open_zarr(tmp_path / "one.zarr")["logits"].values
    b = xr.open_zarr(tmp_path / "two.zarr")["logits"].values
    # The same kernels on the same batches in another process: equal to rounding.
    assert_close_logits(b, a, rel=1e-3)
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    assert_close_logits(b, reference_logits(images, "resnet18", str(digits_weights)), rel=2e-2)
