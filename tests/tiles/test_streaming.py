"""One image three times a worker's memory_limit runs tile by tile without being loaded whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import dask_infer
from tests.tiles.nets import TinyFCN

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class _Removals(SchedulerPlugin):
    """Counts workers the scheduler lost (a nanny restarting one over its memory counts)."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.removed.append(worker)


def _pattern(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """A random 64x64 patch per storage chunk, repeated: big, but it compresses well."""
    loc = block_info[0]["array-location"] if block_info else [(0, 0), (0, 0), (0, 0)]
    seed = loc[1][0] * 7919 + loc[2][0]
    patch = np.random.default_rng(seed).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    return np.tile(patch, (1, block.shape[1] // 64, block.shape[2] // 64, 1))


@pytest.mark.slow
def test_an_image_three_times_a_2gb_worker_streams_through_it(tmp_path: Path) -> None:
    side = 45056
    src = tmp_path / "scene.zarr"
    lazy = da.zeros((1, side, side, 3), dtype=np.uint8, chunks=(1, 2048, 2048, 3)).map_blocks(
        _pattern, dtype=np.uint8
    )
    xr.Dataset({"images": (("image", "y", "x", "channel"), lazy)}).to_zarr(
        src, encoding={"images": {"chunks": (1, 2048, 2048, 3), "write_empty_chunks": True}}
    )
    assert side * side * 3 >= 3 * 2e9
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
        summary = dask_infer.run(
            str(src),
            str(tmp_path / "mask.zarr"),
            model="tests.tiles.nets:tiny_fcn",
            tile=1024,
            halo=16,
            client=client,
            progress=False,
            echo=lines.append,
        )
        status = client.run(lambda dask_worker: dask_worker.status.name)
        removed = list(removals.removed)
    assert summary.images == 1 and not removed, removed
    assert not [line for line in lines if "is paused" in line], lines
    assert list(status.values()) == ["running"]
    # Two tiles' masks against the model on a larger crop around them (whole-image forward there).
    stored = xr.open_zarr(src, consolidated=False)["images"]
    mask = xr.open_zarr(tmp_path / "mask.zarr")["mask"]
    net = TinyFCN().eval()
    for y, x in ((0, 0), (21 * 1024, 13 * 1024), (43 * 1024, 43 * 1024)):
        y0, x0 = max(0, y - 64), max(0, x - 64)
        crop = stored[0, y0 : y + 1024 + 64, x0 : x + 1024 + 64].values
        z = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            want = net((z - _MEAN) / _STD)[0].argmax(0).numpy()
        got = mask[0, y : y + 1024, x : x + 1024].values
        np.testing.assert_array_equal(got, want[y - y0 : y - y0 + 1024, x - x0 : x - x0 + 1024])
