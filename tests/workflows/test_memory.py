"""Memory: a dataset three times a worker's memory_limit runs through it; a paused worker is reported."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import xarray as xr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin
from torchvision.transforms import v2

from dask_infer.io.dataset import write_image_dataset
from dask_infer.models import build_model
from dask_infer.workflows.cluster import scheduler_workers
from tests.reference import assert_close_logits, run_small


class _Removals(SchedulerPlugin):
    """Counts workers the scheduler lost (a nanny restarting one over its memory counts)."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.removed.append(worker)


def _tiles(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """Big images that compress well: a random 64x64 tile per image, repeated."""
    start = block_info[0]["array-location"][0][0] if block_info else 0
    tile = np.random.default_rng(start).integers(0, 256, (block.shape[0], 64, 64, 3), dtype=np.uint8)
    return np.tile(tile, (1, block.shape[1] // 64, block.shape[2] // 64, 1))


def test_a_dataset_three_times_a_2gb_worker_runs_without_pausing_it(
    small_weights: Path, tmp_path: Path
) -> None:
    """6 GiB of 1024x1024 RGB images through one worker with a 2 GB memory_limit: chunks are sized for
    what the worker and the model leave, big images are converted to float a few at a time, and the
    buffer pool stays under 1/8 of the limit, so the worker is never paused or restarted."""
    n, size = 2048, 1024
    src = tmp_path / "big.zarr"
    lazy = da.zeros((n, size, size, 3), dtype=np.uint8, chunks=(8, size, size, 3)).map_blocks(
        _tiles, dtype=np.uint8
    )
    write_image_dataset(str(src), lazy, chunk=8)  # type: ignore[arg-type]
    assert n * size * size * 3 >= 3 * 2e9
    removals = _Removals()
    lines: list[str] = []
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            memory_limit="2GB",
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.scheduler.add_plugin(removals)
        summary = run_small(client, src, tmp_path / "o.zarr", small_weights, echo=lines.append)
        status = client.run(lambda dask_worker: dask_worker.status.name)
        removed = list(removals.removed)
    assert summary.images == n and not removed, removed
    assert not [line for line in lines if "is paused" in line], lines
    assert list(status.values()) == ["running"]
    # The first and last images' logits against a plain forward after torchvision's own transforms.
    loaded = build_model("resnet18", weights=str(small_weights))
    transform = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(loaded.input_size, antialias=True),
            v2.CenterCrop(loaded.input_size),
            v2.Normalize(loaded.mean, loaded.std),
        ]
    )
    stored = xr.open_zarr(src)["images"]
    got = xr.open_zarr(tmp_path / "o.zarr")["logits"].values
    for part in (slice(0, 8), slice(n - 8, n)):
        x = transform(torch.from_numpy(stored[part].values).permute(0, 3, 1, 2))
        with torch.inference_mode():
            assert_close_logits(got[part], loaded.module(x).numpy())


def _set_pause(client: Client, fraction: float) -> None:
    def set_fraction(dask_worker: Any) -> None:
        dask_worker.memory_manager.memory_pause_fraction = fraction

    client.run(set_fraction)


def test_a_paused_worker_is_reported_in_one_line_while_the_run_waits(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """Dask pauses the worker (its pause threshold set below what it uses) for a few seconds of the
    run: the run says so once, names the worker and its memory, waits, and completes."""
    lines: list[str] = []
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            memory_limit="4GB",
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        (address,) = scheduler_workers(client)

        def pause_then_resume() -> None:
            deadline = time.monotonic() + 60
            while not any(line.startswith("loading resnet18") for line in lines):
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            _set_pause(client, 0.01)
            time.sleep(6)
            _set_pause(client, 0.8)

        pauser = threading.Thread(target=pause_then_resume, daemon=True)
        pauser.start()
        summary = run_small(
            client, small_dataset, tmp_path / "o.zarr", small_weights, echo=lines.append, chunk_size=16
        )
        pauser.join(timeout=30)
    paused = [line for line in lines if "is paused" in line]
    assert len(paused) == 1, lines
    assert paused[0].startswith(f"worker {address} is paused: its process uses ")
    assert "memory_limit" in paused[0] and "the run waits" in paused[0] and "--chunk-size" in paused[0]
    assert summary.images == 200
