"""Big images cut into tiles with halos: geometry, receptive field, stitching, tiled outputs."""

from dask_infer.tiles.field import Field, auto_halo, measure_field
from dask_infer.tiles.grid import Box, TileGrid, Window, dense_grid, sliding_grid, storage_chunks
from dask_infer.tiles.stitch import core_of, tiled_forward

__all__ = [
    "Box",
    "Field",
    "TileGrid",
    "Window",
    "auto_halo",
    "core_of",
    "dense_grid",
    "measure_field",
    "sliding_grid",
    "storage_chunks",
    "tiled_forward",
]
