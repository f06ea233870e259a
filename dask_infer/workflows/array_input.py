"""``run`` given an ``xarray.DataArray``: the Zarr store and variable it is the whole of.

``dask_infer.open_images`` records its store, variable and layout in the DataArray's attrs.
When the DataArray is still that store's whole image array (same shape, same images in
the same order), ``run`` reads the store itself, with resume, summary and report as for a
path. Any other DataArray (a selection, a computed array, one opened another way) runs
through :mod:`dask_infer.workflows.array_run`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from dask_infer.errors import InputError
from dask_infer.io.images import describe_source, image_coords

__all__ = ["store_of"]

_DIMS = ("image", "y", "x", "channel")


def store_of(array: xr.DataArray, options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The store path ``array`` is the whole of, and ``options`` with its variable and layout.

    ``None`` when ``array`` was not opened by ``dask_infer.open_images``, or is no longer
    the whole of its store's image array (a selection, a reordering).

    Raises
    ------
    InputError
        When ``options`` name another variable or layout than the DataArray's.
    """
    url, variable = array.attrs.get("source"), array.attrs.get("variable")
    if not isinstance(url, str) or not isinstance(variable, str) or "layout" not in array.attrs:
        return None
    storage_options = options.get("storage_options") or {}
    source = describe_source(
        url, variable=variable or None, layout=str(array.attrs["layout"]), storage_options=storage_options
    )
    whole = (source.n_images, *source.image_shape)
    if tuple(array.dims) != _DIMS or tuple(array.shape) != whole:
        return None
    stored = image_coords(source).get("image", np.arange(source.n_images))
    if "image" in array.coords and not np.array_equal(np.asarray(array["image"].values), stored):
        return None
    for name, value in (("variable", variable or None), ("layout", array.attrs["layout"])):
        if options.get(name) not in (None, value):
            raise InputError(
                f"{name}={options[name]!r} but the DataArray is {name} {value!r} of {url!r}; leave {name} out"
            )
    return url, {**options, "variable": variable or None, "layout": array.attrs["layout"]}
