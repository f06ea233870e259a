"""The tile memory precheck: the estimate with literals, and a refusal on a LocalCluster before any work."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import dask_infer
from dask_infer.errors import InputError
from dask_infer.tiles.memory import TileBatch, check_tile_memory, worker_memory_limit


def test_one_batch_counts_float32_input_scores_weights_and_the_resampled_read() -> None:
    dense = TileBatch(tile=512, halo=64, side=640, batch=1, channels=3, classes=21, dense=True)
    assert dense.bytes == 640 * 640 * (3 + 21) * 4
    scores = TileBatch(tile=224, halo=0, side=224, batch=32, channels=3, classes=1000, dense=False)
    assert scores.bytes == (32 * 224 * 224 * 3 + 32 * 1000) * 4
    extra = TileBatch(512, 0, 512, 1, 3, 2, True, weight_bytes=1000, read_bytes=24)
    assert extra.bytes == 512 * 512 * 5 * 4 + 1024
    # A GPU holds the float32 input, the window's scores and the weights; the host the uint8
    # pixels and the core's scores.
    gpu = TileBatch(512, 64, 640, 1, 3, 21, True, weight_bytes=1000, on_gpu=True)
    assert gpu.bytes == 640 * 640 * 3 + 512 * 512 * 21 * 4


def test_a_batch_over_the_smallest_limit_is_refused_in_one_line() -> None:
    workers = {"a": {"memory_limit": 4 * 2**30}, "b": {"memory_limit": 2**30}, "c": {"memory_limit": 0}}
    assert worker_memory_limit(workers) == 2**30
    assert worker_memory_limit({"a": {"memory_limit": 0}}) is None
    fits = TileBatch(tile=512, halo=64, side=640, batch=1, channels=3, classes=21, dense=True)
    check_tile_memory(fits, 2**30)
    check_tile_memory(fits, None)
    big = TileBatch(tile=4096, halo=256, side=4608, batch=1, channels=3, classes=21, dense=True)
    with pytest.raises(InputError) as err:
        check_tile_memory(big, 2**30)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("tile=4096, halo=256, batch=1: one batch of tiles (4608x4608 pixels")
    assert "more than the workers' memory limit 1.00 GiB; give a smaller --tile or --halo" in message
    rows = TileBatch(tile=224, halo=0, side=224, batch=256, channels=3, classes=1000, dense=False)
    with pytest.raises(InputError, match="batch=256: .* give a smaller --tile or --batch-size"):
        check_tile_memory(rows, 128 * 2**20)


def test_a_run_whose_tiles_cannot_fit_a_worker_is_refused_before_any_work(tmp_path: Path) -> None:
    src, out = tmp_path / "scene.zarr", tmp_path / "o.zarr"
    images = np.random.default_rng(0).integers(0, 256, size=(1, 96, 80, 3), dtype=np.uint8)
    xr.Dataset({"images": (("image", "y", "x", "channel"), images)}).to_zarr(src)
    # The worker's own memory manager would pause a thread-based worker over so small a limit.
    quiet = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause", "terminate")}
    with (
        dask.config.set(quiet),
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, memory_limit="100kB", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        options = {"model": "tests.tiles.nets:tiny_fcn", "client": client, "progress": False, "echo": None}
        # One 80x80 tile in, 4 scores per pixel out, in float32: 179,200 bytes and the weights.
        with pytest.raises(InputError, match=r"^tile=64, halo=8, batch=1: .* memory limit 97.66 kiB; give a"):
            dask_infer.run(str(src), str(out), tile=64, halo=8, **options)
        assert not out.exists()
        loaded = client.run(lambda dask_worker: [n for n in dask_worker.plugins if "runtime" in n])
        assert list(loaded.values()) == [[]]
        # Tiles of 16 fit: 32x32 pixels in and out, about 29 kB.
        dask_infer.run(str(src), str(out), tile=16, halo=8, outputs=("mask",), **options)
    assert xr.open_zarr(out)["mask"].shape == (1, 96, 80)
