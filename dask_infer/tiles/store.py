"""Tiled outputs: a template written up front, one region per tile, and a per-tile manifest for resume.

Dense maps are ``mask`` (image, y, x) and ``logits``/``probabilities`` (image, category,
y, x; ``logits`` float32 or float16), chunked ``tile`` x ``tile`` in y and x exactly as the
tiles' cores, so every tile writes whole chunks of its own. A classifier's tiles give ``mask`` (image, tile_y,
tile_x), the best class, and ``logits``/``probabilities`` (image, tile_y, tile_x,
category), written a row of tiles per task. The manifest ``dask_infer/done_tiles`` has one
element (and one stored chunk) per task: 1 once its results are written.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from dask_infer.errors import InputError
from dask_infer.io.outputs import CATEGORY_DIM, quiet_zarr
from dask_infer.io.stores import WRITER_ATTR, replace_store
from dask_infer.tiles.coords import SpatialGrid
from dask_infer.tiles.grid import TileGrid

__all__ = ["TILE_MANIFEST", "TileTarget", "TileTask", "create_tiled_output", "done_tiles", "write_tile"]

TILE_MANIFEST = "dask_infer/done_tiles"
"""Array of the output with one element per tile task (image, row, column): 1 once written."""


@dataclass(frozen=True)
class TileTask:
    """One task: tile ``(row, col)`` of image ``image`` (``col`` 0 for a classifier's row of tiles)."""

    image: int
    row: int
    col: int


@dataclass(frozen=True)
class TileTarget:
    """Where tiled results go; sent with every write task."""

    url: str
    variables: tuple[str, ...]
    dense: bool
    storage_options: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)


def mask_dtype(classes: int) -> str:
    """The smallest integer dtype holding class indices ``0 .. classes - 1``."""
    return "uint8" if classes <= 256 else "uint16" if classes <= 65536 else "int32"


def create_tiled_output(
    url: str,
    *,
    n_images: int,
    grid: TileGrid,
    classes: int,
    outputs: tuple[str, ...],
    spatial: SpatialGrid,
    image_coords: dict[str, np.ndarray],
    class_names: tuple[str, ...] | None,
    attrs: dict[str, Any],
    overwrite: bool,
    storage_options: dict[str, Any] | None = None,
    logits_dtype: str = "float32",
) -> TileTarget:
    """Write the output's metadata and coordinates; tiles' tasks write the data.

    ``logits`` are stored as ``logits_dtype`` (float32 or float16), ``probabilities`` as float32.
    """
    options = dict(storage_options or {})
    if overwrite:
        replace_store(url, options)
    tile = grid.tile
    variables: dict[str, tuple[tuple[str, ...], Any]] = {}
    coords: dict[str, Any] = {}
    if grid.dense:
        ydim, xdim = spatial.y_dim, spatial.x_dim
        plane = (grid.height, grid.width)
        if "mask" in outputs:
            variables["mask"] = (
                ("image", ydim, xdim),
                da.zeros((n_images, *plane), dtype=mask_dtype(classes), chunks=(1, tile, tile)),
            )
        for name in ("logits", "probabilities"):
            if name in outputs:
                dtype = logits_dtype if name == "logits" else "float32"
                variables[name] = (
                    ("image", CATEGORY_DIM, ydim, xdim),
                    da.zeros((n_images, classes, *plane), dtype=dtype, chunks=(1, classes, tile, tile)),
                )
        for dim, coord, size in ((ydim, spatial.y, grid.height), (xdim, spatial.x, grid.width)):
            coords[dim] = coord if coord is not None else (dim, np.arange(size))
        manifest = (n_images, grid.rows, grid.cols)
    else:
        rows, cols = grid.rows, grid.cols
        if "mask" in outputs:
            variables["mask"] = (
                ("image", "tile_y", "tile_x"),
                da.zeros((n_images, rows, cols), dtype=mask_dtype(classes), chunks=(1, 1, cols)),
            )
        for name in ("logits", "probabilities"):
            if name in outputs:
                dtype = logits_dtype if name == "logits" else "float32"
                variables[name] = (
                    ("image", "tile_y", "tile_x", CATEGORY_DIM),
                    da.zeros((n_images, rows, cols, classes), dtype=dtype, chunks=(1, 1, cols, classes)),
                )
        ys, xs = grid.centres()
        for dim, source_dim, pos, coord in (
            ("tile_y", spatial.y_dim, ys, spatial.y),
            ("tile_x", spatial.x_dim, xs, spatial.x),
        ):
            kept = dict(coord.attrs) if coord is not None else {}
            kept["description"] = f"centre of each tile along {source_dim}"
            coords[dim] = (dim, spatial.at(source_dim, pos), kept)
        manifest = (n_images, rows, 1)
    coords[CATEGORY_DIM] = np.arange(classes)
    if class_names is not None and len(class_names) == classes:
        coords["class_name"] = (CATEGORY_DIM, np.asarray(class_names, dtype=str))
    for name, values in image_coords.items():
        coords[name] = ("image", values)
    coords.setdefault("image", np.arange(n_images))
    for name, scalar in spatial.scalars.items():
        coords.setdefault(name, scalar)
    ds = xr.Dataset(variables, coords=coords, attrs={WRITER_ATTR: "predictions", **_json_attrs(attrs)})
    for name in variables:
        ds[name].attrs.update(spatial.attrs)
    encoding = {name: {"chunks": ds[name].data.chunksize} for name in variables}
    with quiet_zarr():
        ds.to_zarr(
            url,
            mode="w",
            compute=False,
            consolidated=False,
            encoding=encoding,
            storage_options=options or None,
        )
    group = zarr.open_group(store=url, mode="r+", storage_options=options or None)
    group.create_array(TILE_MANIFEST, shape=manifest, chunks=(1, 1, 1), dtype="uint8", fill_value=0)
    return TileTarget(url, tuple(variables), grid.dense, options)


def _json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in attrs.items()}


@lru_cache(maxsize=16)
def _arrays(url: str, options_json: str, token: str, names: tuple[str, ...]) -> dict[str, zarr.Array]:
    """The arrays ``names`` of the output, opened once per process and opening of the output."""
    options = json.loads(options_json)
    group = zarr.open_group(store=url, mode="r+", storage_options=options or None)
    return {name: group[name] for name in names}  # type: ignore[misc]


def write_tile(target: TileTarget, task: TileTask, box: tuple[int, int, int, int], result: dict) -> int:
    """Write one task's results; ``box`` is its core ``(y0, y1, x0, x1)`` (dense) or unused. Returns 1."""
    arrays = _arrays(
        target.url,
        json.dumps(target.storage_options, sort_keys=True),
        target.token,
        (*target.variables, TILE_MANIFEST),
    )
    y0, y1, x0, x1 = box
    for name in target.variables:
        values = result[name]
        if not target.dense:
            arrays[name][task.image, task.row] = values
        elif name == "mask":
            arrays[name][task.image, y0:y1, x0:x1] = values
        else:
            arrays[name][task.image, :, y0:y1, x0:x1] = values
    # Only after every variable is written: a tile marked done is complete on disk.
    arrays[TILE_MANIFEST][task.image, task.row, task.col] = 1
    return 1


def done_tiles(url: str, storage_options: dict[str, Any] | None = None) -> set[TileTask]:
    """The tasks an output's manifest records as written.

    Raises
    ------
    InputError
        When ``url`` holds no tiled run's manifest.
    """
    try:
        group = zarr.open_group(store=url, mode="r", storage_options=storage_options or None)
        flags = np.asarray(group[TILE_MANIFEST][:])  # type: ignore[index]
    except Exception as exc:
        raise InputError(
            f"output {url!r} holds no tiled run to resume (no {TILE_MANIFEST} manifest); run without --resume"
        ) from exc
    return {TileTask(int(i), int(r), int(c)) for i, r, c in zip(*np.nonzero(flags), strict=True)}
