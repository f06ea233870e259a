"""GPU checks: pinned buffers, the copy-stream runtime, and a LocalCUDACluster run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dask_infer.io.buffers import HostBufferPool
from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from tests.reference import reference_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_pool_leases_pinned_memory() -> None:
    arr = HostBufferPool(capacity=2, pinned=True).lease((8, 32, 32, 3), "uint8")
    assert torch.from_numpy(arr).is_pinned()


def test_cuda_runtime_matches_cpu(small_dataset: Path, small_weights: Path) -> None:
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    from dask_infer.models.registry import build_model

    loaded = build_model("resnet18", weights=str(small_weights))
    spec = RuntimeSpec(
        model="resnet18",
        weights=str(small_weights),
        num_classes=10,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        outputs=("logits",),
        top_k=5,
        batch_size=48,
        device="cuda",
    )
    runtime = ModelRuntime(spec, "gpu-test")
    runtime.load()
    got = runtime.forward(images).numpy()
    want = reference_logits(images, "resnet18", str(small_weights))
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99


def test_local_cuda_cluster_run(small_dataset: Path, small_weights: Path, tmp_path: Path) -> None:
    import xarray as xr

    import dask_infer

    summary = dask_infer.run(
        str(small_dataset),
        str(tmp_path / "o.zarr"),
        model="resnet18",
        weights=str(small_weights),
        compress="bf16+channels_last",
        progress=False,
        echo=None,
    )
    assert summary.cluster.startswith("LocalCUDACluster")
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    want = reference_logits(images, "resnet18", str(small_weights))
    got = xr.open_zarr(tmp_path / "o.zarr")["logits"].values
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
