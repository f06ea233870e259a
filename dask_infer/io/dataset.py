"""Write image arrays as a Zarr dataset that dask-infer and plain xarray read."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from dask_infer.errors import InputError
from dask_infer.io.outputs import quiet_zarr
from dask_infer.io.stores import WRITER_ATTR, replace_store, store_exists

__all__ = ["write_image_dataset"]


def write_image_dataset(
    output: str,
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    extra_coords: dict[str, np.ndarray] | None = None,
    attrs: dict[str, Any] | None = None,
    chunk: int = 64,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Store ``images`` (N, y, x, channel) with an ``image`` index and optional labels.

    Parameters
    ----------
    output
        Zarr store to create (Zarr format 3, zstd-compressed by default).
    images
        uint8 or float array of shape (image, y, x, channel).
    labels
        Integer class per image, stored as the ``label`` coordinate.
    extra_coords
        More per-image coordinates (for example ``held_out``).
    attrs
        Dataset attributes (for example ``class_names``).
    chunk
        Images per storage chunk.
    overwrite
        Replace an existing store that dask-infer wrote (or an empty folder); anything
        else is refused.
    storage_options
        fsspec options for remote stores.
    """
    if images.ndim != 4:
        raise InputError(f"images must have dims (image, y, x, channel); got shape {images.shape}")
    if store_exists(output, storage_options) and not overwrite:
        raise InputError(f"output {output!r} exists; pass --overwrite to replace it")
    if overwrite:
        replace_store(output, storage_options)
    n = images.shape[0]
    coords: dict[str, Any] = {"image": np.arange(n, dtype=np.int64)}
    if labels is not None:
        coords["label"] = ("image", np.asarray(labels, dtype=np.int64))
    for name, values in (extra_coords or {}).items():
        coords[name] = ("image", np.asarray(values))
    ds = xr.Dataset(
        {"images": (("image", "y", "x", "channel"), images)},
        coords=coords,
        attrs={WRITER_ATTR: "dataset", **(attrs or {})},
    )
    # Every chunk stored, all-zero ones too: a run refuses absent chunks as possibly lost.
    encoding = {"images": {"chunks": (min(chunk, n), *images.shape[1:]), "write_empty_chunks": True}}
    with quiet_zarr():
        ds.to_zarr(
            output, mode="w", encoding=encoding, storage_options=storage_options or None, consolidated=True
        )
        return xr.open_zarr(output, storage_options=storage_options or None)
