"""Open a Zarr store of images lazily, validated, as (image, y, x, channel)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.core.sync import sync

from dask_infer.errors import InputError
from dask_infer.io.buffers import host_pool
from dask_infer.io.dims import ROLE_NAMES, layout_from_dims
from dask_infer.io.stores import open_store_node, store_exists

__all__ = [
    "SUPPORTED_DTYPES",
    "ImageSource",
    "MissingChunks",
    "check_missing_chunks",
    "describe_source",
    "find_missing_chunks",
    "image_coords",
    "image_layout",
    "non_finite_pixels",
    "open_images",
    "read_chunk",
]

SUPPORTED_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")
_CHANNEL_NAMES = ROLE_NAMES["channel"]
_PREFERRED = ("images", "image", "pixels", "data", "x")


@dataclass(frozen=True)
class ImageSource:
    """Where the images are and how to read them; small enough to send with every task.

    ``layout`` is the stored axis order: ``"NHWC"``, ``"NCHW"`` or ``"NHW"`` (grayscale
    without a channel axis). Reads always return ``(image, y, x, channel)``.
    """

    url: str
    variable: str
    layout: str
    shape: tuple[int, ...]
    dtype: str
    storage_chunk: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    zarr_format: int = 3

    @property
    def n_images(self) -> int:
        """Number of images."""
        return self.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image, as read."""
        if self.layout == "NHWC":
            return self.shape[1], self.shape[2], self.shape[3]
        if self.layout == "NCHW":
            return self.shape[2], self.shape[3], self.shape[1]
        return self.shape[1], self.shape[2], 1

    @property
    def channels(self) -> int:
        """Channels (bands) of one image, as stored."""
        return self.image_shape[2]

    @property
    def bytes_per_image(self) -> int:
        """Decoded bytes of one image, at its stored dtype."""
        height, width, channels = self.image_shape
        return height * width * channels * np.dtype(self.dtype).itemsize


def _dim_names(arr: zarr.Array) -> tuple[str, ...] | None:
    names = getattr(arr.metadata, "dimension_names", None)
    if names is None:
        names = arr.attrs.get("_ARRAY_DIMENSIONS")
    if not isinstance(names, list | tuple) or any(n is None for n in names):
        return None
    return tuple(str(n) for n in names)


def _layout(name: str, shape: tuple[int, ...], dims: tuple[str, ...] | None, layout: str) -> str:
    ndim = len(shape)
    if ndim == 3:
        if layout not in ("auto", "NHW"):
            raise InputError(f"array {name!r} has 3 dims {shape}; layout={layout!r} needs 4 dims")
        return "NHW"
    if ndim != 4:
        raise InputError(
            f"array {name!r} has {ndim} dims {shape}; expected (image, y, x, channel), "
            "(image, channel, y, x) or (image, y, x)"
        )
    if layout != "auto":
        return layout
    if dims is not None:
        lowered = [d.lower() for d in dims]
        if lowered[3] in _CHANNEL_NAMES:
            return "NHWC"
        if lowered[1] in _CHANNEL_NAMES:
            return "NCHW"
    if shape[3] in (1, 3, 4):
        return "NHWC"
    if shape[1] in (1, 3, 4):
        return "NCHW"
    raise InputError(
        f"cannot tell the channel axis of array {name!r} with shape {shape}: expected 1, 3 or 4 "
        "channels last or second, or dim names that say; pass layout='NHWC' or 'NCHW', or map "
        "the dims (--dims image=...,channel=...)"
    )


def _pick_variable(group: zarr.Group, url: str, variable: str | None) -> tuple[str, zarr.Array]:
    arrays = dict(group.arrays())
    if variable is not None:
        if variable not in arrays:
            raise InputError(
                f"store {url!r} has no array {variable!r}; it has: {', '.join(sorted(arrays)) or 'none'}"
            )
        return variable, arrays[variable]
    candidates = {k: v for k, v in arrays.items() if v.ndim >= 3}
    if not candidates:
        raise InputError(
            f"store {url!r} holds no image array (an array with 3 or 4 dims); "
            f"it has: {', '.join(sorted(arrays)) or 'nothing'}"
        )
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    for name in _PREFERRED:
        if name in candidates:
            return name, candidates[name]
    raise InputError(
        f"store {url!r} holds several image arrays ({', '.join(sorted(candidates))}); "
        "choose one with --variable"
    )


def image_layout(
    label: str,
    shape: tuple[int, ...],
    names: tuple[str, ...] | None,
    *,
    layout: str = "auto",
    dims: Mapping[str, str] | None = None,
) -> str:
    """The layout (``NHWC``, ``NCHW``, ``NHW``) of array ``label`` with ``shape`` and dim ``names``.

    ``dims`` maps roles to dim names (see :func:`dask_infer.io.dims.layout_from_dims`);
    without it the layout is ``layout``, or told from the names and shape.

    Raises
    ------
    InputError
        When the array's dims cannot be read as images, or ``layout`` contradicts ``dims``.
    """
    if not dims:
        return _layout(label, shape, names, layout)
    if len(shape) not in (3, 4):
        _layout(label, shape, None, "auto")
    lay = layout_from_dims(label, names, shape, dims)
    if layout not in ("auto", lay):
        raise InputError(
            f"layout={layout!r} but the dims of array {label!r} mapped by dims={dict(dims)!r} are "
            f"{lay}; leave layout out"
        )
    return lay


def describe_source(
    url: str,
    *,
    variable: str | None = None,
    layout: str = "auto",
    dims: Mapping[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ImageSource:
    """Open and validate the image array of a Zarr store without reading pixels.

    Parameters
    ----------
    url
        Zarr store (v2 or v3): a local path or any fsspec URL.
    variable
        Name of the image array when the store holds several.
    layout
        ``"auto"``, ``"NHWC"`` or ``"NCHW"``.
    dims
        Roles (``image``, ``y``, ``x``, ``channel``) -> the array's dim names, for arrays
        whose dims have other names (``{"image": "time", "channel": "band"}``); see
        :func:`dask_infer.io.dims.layout_from_dims`.
    storage_options
        fsspec options for remote stores.

    Raises
    ------
    InputError
        When the store does not exist, holds no usable image array, or the array has
        the wrong number of dims, an unknown channel axis, dims that ``dims`` does not
        fit, or an unsupported dtype.
    """
    options = dict(storage_options or {})
    if not store_exists(url, options):
        raise InputError(f"input {url!r} does not exist")
    node = open_store_node(url, options)
    if isinstance(node, zarr.Array):
        name, arr = "", node
    else:
        name, arr = _pick_variable(node, url, variable)
    label = name or url
    shape = tuple(int(s) for s in arr.shape)
    lay = image_layout(label, shape, _dim_names(arr), layout=layout, dims=dims)
    dtype = np.dtype(arr.dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise InputError(
            f"array {label!r} has dtype {dtype.name}; supported: {', '.join(SUPPORTED_DTYPES)} "
            "(floats are taken to lie in [0, 1])"
        )
    if shape[0] == 0:
        raise InputError(f"array {label!r} holds no images (shape {shape})")
    if 0 in shape:
        raise InputError(
            f"array {label!r} has images of zero size (shape {shape}); give images of at least 1x1"
        )
    names = None
    if not isinstance(node, zarr.Array):
        raw = node.attrs.get("class_names") or arr.attrs.get("class_names")
        if isinstance(raw, list | tuple):
            names = tuple(str(c) for c in raw)
    return ImageSource(
        url=url,
        variable=name,
        layout=lay,
        shape=shape,
        dtype=dtype.name,
        storage_chunk=int(arr.chunks[0]),
        storage_options=options,
        class_names=names,
        zarr_format=int(arr.metadata.zarr_format),
    )


@lru_cache(maxsize=16)
def _cached_array(url: str, variable: str, options_json: str) -> zarr.Array:
    node = open_store_node(url, json.loads(options_json))
    if isinstance(node, zarr.Array):
        return node
    return node[variable]  # type: ignore[return-value]


def _read_into(arr: zarr.Array, start: int, stop: int, out: np.ndarray) -> None:
    """Decode images ``start:stop`` straight into ``out`` where Zarr allows it."""
    try:
        from zarr.core.buffer import default_buffer_prototype

        target = default_buffer_prototype().nd_buffer.from_numpy_array(out)
        arr.get_basic_selection((slice(start, stop),), out=target)
    except (ImportError, TypeError, AttributeError, NotImplementedError):
        out[...] = arr[start:stop]


def read_chunk(source: ImageSource, start: int, stop: int, *, pooled: bool = True) -> np.ndarray:
    """Read images ``start:stop`` as a contiguous (image, y, x, channel) array.

    Opened arrays are cached per process, so a worker opens each store once. With
    ``pooled``, the array lives in a reusable (pinned, on GPU machines) host buffer.
    """
    arr = _cached_array(source.url, source.variable, json.dumps(source.storage_options, sort_keys=True))
    height, width, channels = source.image_shape
    shape = (stop - start, height, width, channels)
    out = host_pool().lease(shape, source.dtype) if pooled else np.empty(shape, source.dtype)
    if source.layout == "NHWC":
        _read_into(arr, start, stop, out)
    elif source.layout == "NCHW":
        out[...] = np.asarray(arr[start:stop]).transpose(0, 2, 3, 1)
    else:
        out[..., 0] = arr[start:stop]
    return out


def non_finite_pixels(images: np.ndarray, *, block: int = 64) -> np.ndarray:
    """Count of NaN and infinite values in each image of ``images`` (image first).

    Integer images hold none and are not scanned. Floats are scanned ``block`` images at
    a time, so the temporary mask stays small beside the chunk.
    """
    n = images.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    if images.dtype.kind != "f" or images.size == 0:
        return counts
    flat = images.reshape(n, -1)
    for i in range(0, n, block):
        part = flat[i : i + block]
        counts[i : i + block] = part.shape[1] - np.count_nonzero(np.isfinite(part), axis=1)
    return counts


@dataclass(frozen=True)
class MissingChunks:
    """Storage chunks (shards, where the array is sharded) of the image array absent from its store.

    Attributes
    ----------
    label
        The array and store, as messages name them.
    chunks
        Grid coordinates of each absent chunk, in order.
    total
        Storage chunks the array's grid has.
    images_per_chunk
        Images along the first axis of one storage chunk.
    n_images
        Images in the array.
    fill_value
        What Zarr returns for an absent chunk's elements.
    """

    label: str
    chunks: tuple[tuple[int, ...], ...]
    total: int
    images_per_chunk: int
    n_images: int
    fill_value: Any

    @property
    def image_ranges(self) -> tuple[tuple[int, int], ...]:
        """Merged ``(start, stop)`` ranges of the images that lie in absent chunks."""
        ranges: list[tuple[int, int]] = []
        step = self.images_per_chunk
        for first in sorted({c[0] for c in self.chunks}):
            start, stop = first * step, min((first + 1) * step, self.n_images)
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop)
            else:
                ranges.append((start, stop))
        return tuple(ranges)

    @property
    def n_filled(self) -> int:
        """Images with at least some pixels in an absent chunk."""
        return sum(stop - start for start, stop in self.image_ranges)

    def _images_of(self, chunk: tuple[int, ...]) -> str:
        start = chunk[0] * self.images_per_chunk
        return f"{start}-{min(start + self.images_per_chunk, self.n_images) - 1}"

    def describe(self, shown: int = 3) -> str:
        """The first ``shown`` absent chunks with their images, and the counts."""
        parts = [f"chunk {','.join(map(str, c))} (images {self._images_of(c)})" for c in self.chunks[:shown]]
        more = f" and {len(self.chunks) - shown} more" if len(self.chunks) > shown else ""
        return (
            f"{len(self.chunks)} of {self.total} storage chunks of {self.label} are absent: "
            f"{', '.join(parts)}{more}; {self.n_filled} images in all"
        )


def _fill_value(arr: zarr.Array) -> Any:
    value = arr.fill_value
    if value is None:
        return 0
    return value.item() if isinstance(value, np.generic) else value


async def _list_keys(store: Any, prefix: str) -> set[str]:
    return {key async for key in store.list_prefix(prefix)}


def _stored_keys(arr: zarr.Array) -> set[str]:
    """The array's stored keys relative to the array, from one listing of its prefix."""
    path = arr.store_path.path
    prefix = f"{path}/" if path else ""
    keys = sync(_list_keys(arr.store_path.store, prefix))
    return {key[len(prefix) :] for key in keys}


def find_missing_chunks(source: ImageSource) -> MissingChunks:
    """Which storage chunks of ``source``'s image array the store lacks.

    Zarr does not store a chunk whose every element equals the fill value (unless the
    writer set ``write_empty_chunks``), and reads an absent chunk as the fill value, so a
    lost chunk reads as blank images without a word. The store is listed once, under the
    array's prefix, whatever the number of chunks (local or fsspec, Zarr v2 or v3 keys);
    for a sharded array the shards are checked, not the chunks inside them.
    """
    node = open_store_node(source.url, source.storage_options)
    arr = node if isinstance(node, zarr.Array) else node[source.variable]
    assert isinstance(arr, zarr.Array)
    unit = tuple(int(s) for s in (arr.shards or arr.chunks))
    grid = tuple(-(-int(n) // u) for n, u in zip(arr.shape, unit, strict=True))
    stored = _stored_keys(arr)
    encode = arr.metadata.encode_chunk_key
    absent = tuple(
        coords for coords in itertools.product(*(range(g) for g in grid)) if encode(coords) not in stored
    )
    label = (
        f"input array {source.variable!r} in {source.url!r}" if source.variable else f"input {source.url!r}"
    )
    return MissingChunks(
        label=label,
        chunks=absent,
        total=int(np.prod(grid)),
        images_per_chunk=unit[0],
        n_images=source.n_images,
        fill_value=_fill_value(arr),
    )


def check_missing_chunks(source: ImageSource, policy: str) -> MissingChunks:
    """Refuse an input with absent chunks unless ``policy`` is ``"fill"``; what is absent.

    Raises
    ------
    InputError
        With ``policy="refuse"``, when any storage chunk is absent: one line naming the
        first ones, their images and counts, and the fix.
    """
    missing = find_missing_chunks(source)
    if missing.chunks and policy != "fill":
        fill = missing.fill_value
        raise InputError(
            f"{missing.describe()}. Zarr reads an absent chunk as the fill value ({fill!r}) without "
            f"a word, and a writer with write_empty_chunks=False skips chunks whose every value is {fill!r}, "
            f"so these are lost data or images that are all {fill!r}; pass --missing-chunks fill "
            f"(missing_chunks='fill') to read them as {fill!r} (the output's 'filled' flag marks them)"
        )
    return missing


def image_coords(source: ImageSource) -> dict[str, np.ndarray]:
    """The store's 1-dim arrays along the image axis (``image`` index, ``label``, ...).

    Values are decoded as xarray decodes them (CF ``units``/``calendar`` attrs), so a
    datetime64 or timedelta64 coordinate stays one instead of its stored integers.
    """
    node = open_store_node(source.url, source.storage_options)
    if isinstance(node, zarr.Array):
        return {}
    image_dim = (_dim_names(node[source.variable]) or ("image",))[0]  # type: ignore[arg-type]
    coords: dict[str, np.ndarray] = {}
    for name, arr in node.arrays():
        if name == source.variable or arr.ndim != 1 or arr.shape[0] != source.n_images:
            continue
        dims = _dim_names(arr)
        if dims is not None and dims[0] != image_dim:
            continue
        coords["image" if name == image_dim else name] = _decoded(name, arr)
    return coords


def _decoded(name: str, arr: zarr.Array) -> np.ndarray:
    """A 1-dim array's values with CF time encoding undone (``units`` and ``calendar`` attrs)."""
    attrs = {k: v for k, v in arr.attrs.items() if not k.startswith("_ARRAY_")}
    variable = xr.Variable(("image",), np.asarray(arr[:]), attrs)
    decoded = xr.conventions.decode_cf_variable(name, variable, mask_and_scale=False)
    return np.asarray(decoded.values)


def open_images(
    url: str,
    *,
    variable: str | None = None,
    layout: str = "auto",
    dims: Mapping[str, str] | None = None,
    chunks: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> xr.DataArray:
    """Open a Zarr image array as a lazy, dask-backed ``xarray.DataArray``.

    Parameters
    ----------
    url
        Zarr store (v2 or v3): a local path or any fsspec URL.
    variable
        Name of the image array when the store holds several.
    layout
        ``"auto"``, ``"NHWC"`` or ``"NCHW"``; 3-dim arrays are read as grayscale.
    dims
        Roles -> the array's dim names (``{"image": "time", "channel": "band"}``).
    chunks
        Images per dask chunk; default: the storage chunk.
    storage_options
        fsspec options for remote stores.

    Returns
    -------
    xarray.DataArray
        Dims ``(image, y, x, channel)``, chunked along ``image`` only, with the store's
        1-dim coordinates (``image``, ``label``) and ``class_names`` in attrs.
    """
    source = describe_source(
        url, variable=variable, layout=layout, dims=dims, storage_options=storage_options
    )
    arr = _cached_array(source.url, source.variable, json.dumps(source.storage_options, sort_keys=True))
    data = da.from_zarr(arr)
    if source.layout == "NCHW":
        data = data.transpose(0, 2, 3, 1)
    elif source.layout == "NHW":
        data = data[..., None]
    step = chunks or source.storage_chunk
    data = data.rechunk({0: step, 1: -1, 2: -1, 3: -1})
    attrs: dict[str, Any] = {"source": source.url, "variable": source.variable, "layout": source.layout}
    if source.class_names:
        attrs["class_names"] = list(source.class_names)
    return xr.DataArray(
        data,
        dims=("image", "y", "x", "channel"),
        coords={name: ("image", values) for name, values in image_coords(source).items()},
        name=source.variable or "images",
        attrs=attrs,
    )
