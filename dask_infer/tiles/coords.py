"""The input's y/x grid: its dim names, coordinates (with their attrs) and grid-mapping variables.

A georeferenced store keeps ``x``/``y`` coordinates (projected metres, degrees) and a
0-dim variable such as ``spatial_ref`` whose attrs hold the CRS, named by the image
array's ``grid_mapping`` attr. Tiled outputs carry them through untouched, so the mask
lies on the input's grid; with ``--scale-factor`` on the resampled grid, whose coordinates
(:func:`resampled_grid`) are the input's at each resampled pixel's centre.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from dask_infer.io.images import ImageSource
from dask_infer.tiles.resample import Resampling

__all__ = ["SpatialGrid", "resampled_grid", "spatial_grid"]


@dataclass(frozen=True)
class SpatialGrid:
    """The image array's y and x dims, their coordinates, and the 0-dim variables beside them.

    Attributes
    ----------
    y_dim, x_dim
        The input's names of the y and x dims.
    y, x
        Coordinates along them (with attrs); ``None`` where the input has none.
    scalars
        0-dim variables of the input (``spatial_ref``, ``crs``) with their attrs.
    attrs
        The image array's attrs that name them (``grid_mapping``).
    """

    y_dim: str = "y"
    x_dim: str = "x"
    y: xr.Variable | None = None
    x: xr.Variable | None = None
    scalars: dict[str, xr.Variable] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def at(self, dim: str, positions: list[float]) -> np.ndarray:
        """The coordinate along ``dim`` (``y_dim`` or ``x_dim``) at pixel ``positions``, interpolated.

        Pixel ``i``'s centre is position ``i``; without coordinates the positions themselves.
        """
        coord = self.y if dim == self.y_dim else self.x
        pos = np.asarray(positions, dtype=np.float64)
        if coord is None or coord.dtype.kind not in "iuf":
            return pos
        values = np.asarray(coord.values, dtype=np.float64)
        return np.interp(pos, np.arange(len(values)), values)


def _dims(source: ImageSource, dims: tuple[str, ...]) -> tuple[str, str]:
    if source.layout == "NCHW":
        return dims[2], dims[3]
    return dims[1], dims[2]


def spatial_grid(source: ImageSource) -> SpatialGrid:
    """The y/x grid of ``source``'s image array; plain ``y``/``x`` when the store says nothing."""
    if not source.variable:
        return SpatialGrid()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(
                source.url,
                storage_options=source.storage_options or None,
                consolidated=None,
                decode_times=False,
                chunks=None,
            )
    except Exception:  # a store xarray cannot read (no dim names) has no coordinates to carry
        return SpatialGrid()
    if source.variable not in ds:
        return SpatialGrid()
    image = ds[source.variable]
    y_dim, x_dim = _dims(source, tuple(str(d) for d in image.dims))
    height, width, _ = source.image_shape

    def coord(dim: str, size: int) -> xr.Variable | None:
        if dim in ds.variables and ds[dim].dims == (dim,) and ds.sizes[dim] == size:
            return ds.variables[dim].copy(deep=True).load()
        return None

    scalars = {str(n): v.copy(deep=True).load() for n, v in ds.variables.items() if v.ndim == 0}
    attrs = {k: image.attrs[k] for k in ("grid_mapping",) if k in image.attrs}
    return SpatialGrid(str(y_dim), str(x_dim), coord(y_dim, height), coord(x_dim, width), scalars, attrs)


def _extrapolate(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``values`` (at pixels 0, 1, ...) at ``positions``, linear between pixels and past the ends."""
    if len(values) == 1:
        return np.full(len(positions), values[0])
    index = np.arange(len(values))
    out = np.interp(positions, index, values)
    low, high = positions < 0, positions > len(values) - 1
    out[low] = values[0] + (values[1] - values[0]) * positions[low]
    out[high] = values[-1] + (values[-1] - values[-2]) * (positions[high] - (len(values) - 1))
    return out


def _geotransform(text: str, y_ratio: float, x_ratio: float) -> str:
    """A GDAL ``GeoTransform`` ("x0 dx rx y0 ry dy") for pixels ``x_ratio`` wider and ``y_ratio`` taller."""
    parts = text.split()
    try:
        x0, dx, rx, y0, ry, dy = (float(p) for p in parts)
    except ValueError:
        return text
    return " ".join(f"{v:.17g}" for v in (x0, dx * x_ratio, rx * y_ratio, y0, ry * x_ratio, dy * y_ratio))


def resampled_grid(grid: SpatialGrid, resampling: Resampling) -> SpatialGrid:
    """``grid`` on the resampled pixels: coordinates at their centres, ``GeoTransform`` attrs rescaled.

    Resampled pixel ``i`` lies at input position ``(i + 0.5) * H / H' - 0.5``; numeric
    coordinates are interpolated there (extended linearly past the border pixels), others
    dropped. The resampled image covers the input's extent, so a ``GeoTransform``'s origin
    stays and its pixel sizes scale by ``H / H'`` and ``W / W'``.
    """

    def coord(var: xr.Variable | None, dim: int, size: int) -> xr.Variable | None:
        if var is None or var.dtype.kind not in "iuf":
            return None
        pos = resampling.positions(dim, np.arange(size))
        values = _extrapolate(np.asarray(var.values, dtype=np.float64), pos)
        return xr.Variable(var.dims, values, dict(var.attrs))

    y_ratio = resampling.height / resampling.out_height
    x_ratio = resampling.width / resampling.out_width
    scalars = {}
    for name, var in grid.scalars.items():
        var = var.copy(deep=True)
        if isinstance(var.attrs.get("GeoTransform"), str):
            var.attrs["GeoTransform"] = _geotransform(var.attrs["GeoTransform"], y_ratio, x_ratio)
        scalars[name] = var
    return SpatialGrid(
        grid.y_dim,
        grid.x_dim,
        coord(grid.y, 0, resampling.out_height),
        coord(grid.x, 1, resampling.out_width),
        scalars,
        dict(grid.attrs),
    )
