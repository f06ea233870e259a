"""``run`` given an ``xarray.DataArray``: the Zarr store and variable it is the whole of.

``dask_infer.open_images`` records its store, variable and layout in the DataArray's attrs.
When the DataArray is still that store's whole image array (same shape, same images in
the same order), ``run`` reads the store itself, with resume, summary and report as for a
path. Any other DataArray (a selection, a computed array, one opened another way) is
refused, naming :func:`dask_infer.predict`, whose lazy result ``.to_zarr`` writes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from dask_infer.errors import InputError
from dask_infer.io.images import describe_source, image_coords

__all__ = ["store_of"]

_DIMS = ("image", "y", "x", "channel")


def _refuse(why: str) -> InputError:
    return InputError(
        f"run reads a Zarr store, and this DataArray is not one store's whole image array ({why}); "
        "compute its predictions with dask_infer.predict(images, ...) and write them with "
        ".to_zarr(output), or pass the store's path (or a dask_infer.open_images result) to run"
    )


def store_of(array: xr.DataArray, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The store path ``array`` is the whole of, and ``options`` with its variable and layout.

    Raises
    ------
    InputError
        When ``array`` was not opened by ``dask_infer.open_images``, or is no longer the
        whole of its store's image array.
    """
    url, variable = array.attrs.get("source"), array.attrs.get("variable")
    if not isinstance(url, str) or not isinstance(variable, str) or "layout" not in array.attrs:
        raise _refuse("it was not opened with dask_infer.open_images, so its store is unknown")
    storage_options = options.get("storage_options") or {}
    source = describe_source(
        url, variable=variable or None, layout=str(array.attrs["layout"]), storage_options=storage_options
    )
    whole = (source.n_images, *source.image_shape)
    if tuple(array.dims) != _DIMS or tuple(array.shape) != whole:
        raise _refuse(
            f"its dims {dict(array.sizes)} differ from the store's {dict(zip(_DIMS, whole, strict=True))}"
        )
    stored = image_coords(source).get("image", np.arange(source.n_images))
    if "image" in array.coords and not np.array_equal(np.asarray(array["image"].values), stored):
        raise _refuse("its images are a reordering of the store's")
    for name, value in (("variable", variable or None), ("layout", array.attrs["layout"])):
        if options.get(name) not in (None, value):
            raise InputError(
                f"{name}={options[name]!r} but the DataArray is {name} {value!r} of {url!r}; leave {name} out"
            )
    return url, {**options, "variable": variable or None, "layout": array.attrs["layout"]}
