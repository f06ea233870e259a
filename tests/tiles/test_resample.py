"""--scale-factor's resampling: torch's whole-image interpolate, reproduced tile by tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from dask_infer.tiles.coords import SpatialGrid, resampled_grid
from dask_infer.tiles.grid import Box, dense_grid
from dask_infer.tiles.resample import Resampling, resample_window, resampled_size


def _torch_whole(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """The independent reference: torch's interpolate on the whole (1, y, x, c) image."""
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float()
    kwargs = {} if mode == "nearest" else {"antialias": True, "align_corners": False}
    return F.interpolate(x, size=size, mode=mode, **kwargs).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("factor", [0.5, 0.3, 0.77, 1.7, 2.0])
def test_tiles_of_the_resampled_image_equal_torch_on_the_whole_image(mode: str, factor: float) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(1, 37, 53, 3)).astype(np.float64)
    r = Resampling.by(37, 53, factor, mode)
    want = _torch_whole(image.astype(np.float32), (r.out_height, r.out_width), mode)
    stitched = np.zeros_like(want)
    for w in dense_grid(r.out_height, r.out_width, 8, 0).windows():
        region, wy, wx = r.weights(w.core)
        part = resample_window(image[:, region.y0 : region.y1, region.x0 : region.x1], wy, wx)
        stitched[:, w.core.y0 : w.core.y1, w.core.x0 : w.core.x1] = part
    # float32 weights in torch against float64 here: a few ulps of 255.
    assert np.abs(stitched - want).max() <= 1e-5 * 255
    full, wy, wx = r.weights(Box(0, r.out_height, 0, r.out_width))
    whole = resample_window(image[:, full.y0 : full.y1, full.x0 : full.x1], wy, wx)
    # Whichever tile computes a pixel, it is the same value.
    np.testing.assert_array_equal(stitched, whole)


def test_a_tile_reads_only_its_region_and_interpolation_margin() -> None:
    r = Resampling.by(1000, 800, 0.5, "bilinear")
    assert (r.out_height, r.out_width) == (500, 400)
    # Shrinking by 2: the antialiasing filter reaches 2 input pixels from each centre.
    assert r.source(Box(100, 132, 200, 232)) == Box(199, 265, 399, 465)
    assert r.source(Box(0, 32, 0, 32)) == Box(0, 65, 0, 65)
    up = Resampling.by(100, 100, 2.0, "bilinear")
    assert up.source(Box(50, 60, 50, 60)) == Box(24, 31, 24, 31)


def test_resampled_size_is_the_floor_as_interpolate_gives_it() -> None:
    assert [resampled_size(n, f) for n, f in ((10, 0.3), (10, 0.7), (97, 0.5), (5, 2.0))] == [3, 7, 48, 10]
    x = torch.zeros(1, 1, 97, 10)
    assert F.interpolate(x, scale_factor=0.5).shape[-2:] == (48, 5)


def test_coordinates_follow_the_resampled_pixels_centres() -> None:
    ys = xr.Variable("y", 5_000_000.0 - 10.0 * np.arange(6) - 5.0, {"units": "m"})
    xs = xr.Variable("x", 400_000.0 + 10.0 * np.arange(4) + 5.0, {"units": "m"})
    ref = xr.Variable((), 0, {"GeoTransform": "400000 10 0 5000000 0 -10", "crs_wkt": "X"})
    grid = SpatialGrid("y", "x", ys, xs, {"spatial_ref": ref}, {"grid_mapping": "spatial_ref"})
    half = resampled_grid(grid, Resampling.by(6, 4, 0.5, "bilinear"))
    assert half.y is not None and half.x is not None
    np.testing.assert_allclose(half.y.values, [4_999_990.0, 4_999_970.0, 4_999_950.0])
    np.testing.assert_allclose(half.x.values, [400_010.0, 400_030.0])
    assert half.y.attrs == {"units": "m"} and half.attrs == {"grid_mapping": "spatial_ref"}
    assert half.scalars["spatial_ref"].attrs == {"GeoTransform": "400000 20 0 5000000 0 -20", "crs_wkt": "X"}
    assert ref.attrs["GeoTransform"] == "400000 10 0 5000000 0 -10"
    # Enlarging puts the outer pixels' centres beyond the input's: extended linearly.
    double = resampled_grid(grid, Resampling.by(6, 4, 2.0, "bilinear"))
    assert double.x is not None
    np.testing.assert_allclose(double.x.values, 400_000.0 + 5.0 * np.arange(8) + 2.5)
