"""Output store: a template written up front, chunk-aligned region writes, then attrs."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from dask_infer.errors import InputError
from dask_infer.io.stores import (
    WRITER_ATTR,
    check_replaceable,
    is_url,
    normalise_location,
    replace_store,
    store_exists,
)

__all__ = [
    "CATEGORY_DIM",
    "FEATURE_DIM",
    "FILLED_ATTR",
    "LEGACY_CATEGORY_DIM",
    "MANIFEST",
    "OutputTarget",
    "check_output_location",
    "create_output",
    "done_chunks",
    "finalize_output",
    "invalid_images",
    "open_output",
    "open_results",
    "result_dims",
    "with_current_dims",
    "write_chunk",
]

CATEGORY_DIM = "category"
"""Dim of a classifier's scores. Not ``class``, a Python keyword (``ds.sel(class=3)`` does not
parse), nor ``label``, which input stores use for per-image ground truth that the output keeps."""

LEGACY_CATEGORY_DIM = "class"
"""What outputs written before the ``category`` dim called it; :func:`open_results` renames it."""

FEATURE_DIM = "feature"
"""Dim of a feature layer's flattened values."""

MANIFEST = "dask_infer/done"
"""Array in the output store with one element (and one stored chunk) per task chunk: 1 once
that chunk's results are written. xarray does not read it (it lives in a subgroup), and as 1
is not the fill value, a stored element is proof of a finished write."""

FILLED_ATTR = "dask_infer_filled_images"
"""Output attr: ``[start, stop)`` ranges of the images read as the fill value (absent input chunks)."""

_FLAGS = ("valid", "filled")
"""Per-image coordinates the output adds: ``valid`` (written by each chunk's task: every pixel
finite) and ``filled`` (known up front: some pixels lay in an absent input chunk)."""

_RESULTS = ("logits", "probabilities", "top_k_class", "top_k_probability", "features", "valid")
"""What a chunk's task writes, where the output has it."""


def result_dims(shape: Sequence[int], activation: str) -> tuple[str, ...]:
    """Dims after ``image`` of a model output of per-image ``shape``.

    ``category`` for scores an activation turns into probabilities; for a raw output
    (``activation="none"``) ``output`` for one dim, ``output_0``, ``output_1``, ... for more.
    """
    if activation != "none" and len(shape) == 1:
        return (CATEGORY_DIM,)
    if len(shape) == 1:
        return ("output",)
    return tuple(f"output_{i}" for i in range(len(shape)))


@contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence Zarr's notices about v3 extensions (strings, consolidated metadata) we rely on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


@dataclass(frozen=True)
class OutputTarget:
    """Where results go, and which variables each chunk writes; sent with write tasks."""

    url: str
    variables: tuple[str, ...]
    chunk: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Names this opening of the output: workers keep its arrays open under it."""

    def open(self, mode: str = "r+") -> zarr.Group:
        """The output's root group."""
        kwargs: dict[str, Any] = {"mode": mode}
        if self.storage_options:
            kwargs["storage_options"] = self.storage_options
        return zarr.open_group(store=self.url, **kwargs)


def check_output_location(
    input_url: str, output_url: str, *, overwrite: bool, storage_options: dict, resume: bool = False
) -> None:
    """Refuse an output that is, contains or lies inside the input, or exists without ``overwrite``.

    With ``overwrite``, what exists must be a store dask-infer wrote (or an empty folder):
    anything else is refused here, before any work, and left untouched.
    """
    src, dst = normalise_location(input_url), normalise_location(output_url)
    sep = "/" if is_url(dst) else os.sep
    if dst == src or dst.startswith(src + sep) or src.startswith(dst + sep):
        raise InputError(
            f"output {output_url!r} would overwrite the input {input_url!r}; choose another output path"
        )
    if store_exists(output_url, storage_options) and not resume:
        if not overwrite:
            raise InputError(
                f"output {output_url!r} exists; pass --overwrite to replace it, or --resume to finish it"
            )
        check_replaceable(output_url, storage_options)


def create_output(
    url: str,
    *,
    n_images: int,
    result_shape: tuple[int, ...],
    top_k: int,
    chunk: int,
    outputs: tuple[str, ...],
    image_coords: dict[str, np.ndarray],
    class_names: tuple[str, ...] | None,
    attrs: dict[str, Any],
    overwrite: bool,
    activation: str = "softmax",
    feature_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
    filled: Sequence[tuple[int, int]] = (),
) -> OutputTarget:
    """Write the output's metadata and coordinates; data chunks are written by tasks.

    The output is an xarray Dataset with ``logits``/``probabilities`` (image, category)
    and ``top_k_class``/``top_k_probability`` (image, rank), chunked along ``image``
    exactly as the tasks are, so each task writes whole chunks of its own. A model whose
    per-image output (``result_shape``) is not a vector of scores (``activation="none"``)
    has ``logits`` over (image, output) or (image, output_0, output_1, ...); a feature
    layer's values are ``features`` over (image, feature). Input coordinates keep their
    values and dtypes. Two boolean
    per-image coordinates flag bad data: ``valid`` (every pixel finite; written with
    the results) and ``filled`` (images ``filled``, ``(start, stop)`` ranges, were read
    from absent input chunks as the fill value; also listed in the ``dask_infer_filled_images``
    attr). An input coordinate with one of those names is kept as ``input_<name>``.
    """
    options = dict(storage_options or {})
    if overwrite:
        replace_store(url, options)
    dims = result_dims(result_shape, activation)
    rows = (n_images, *result_shape)
    variables: dict[str, tuple[tuple[str, ...], Any]] = {}
    for name in ("logits", "probabilities"):
        if name in outputs:
            variables[name] = (
                ("image", *dims),
                da.zeros(rows, dtype="float32", chunks=(chunk, *result_shape)),
            )
    if "top_k" in outputs:
        variables["top_k_class"] = (
            ("image", "rank"),
            da.zeros((n_images, top_k), dtype="int64", chunks=(chunk, -1)),
        )
        variables["top_k_probability"] = (
            ("image", "rank"),
            da.zeros((n_images, top_k), dtype="float32", chunks=(chunk, -1)),
        )
    if "features" in outputs:
        if feature_size is None:
            raise ValueError("outputs include 'features' but no feature_size is given")
        variables["features"] = (
            ("image", FEATURE_DIM),
            da.zeros((n_images, feature_size), dtype="float32", chunks=(chunk, -1)),
        )
    coords: dict[str, Any] = {dim: np.arange(size) for dim, size in zip(dims, result_shape, strict=True)}
    if "top_k" in outputs:
        coords["rank"] = np.arange(top_k)
    if feature_size is not None and "features" in outputs:
        coords[FEATURE_DIM] = np.arange(feature_size)
    for name, values in image_coords.items():
        coords[f"input_{name}" if name in _FLAGS else name] = ("image", values)
    coords.setdefault("image", np.arange(n_images))
    if class_names is not None and dims == (CATEGORY_DIM,) and len(class_names) == result_shape[0]:
        coords["class_name"] = (CATEGORY_DIM, np.asarray(class_names, dtype=str))
    coords["valid"] = ("image", da.zeros(n_images, dtype=bool, chunks=chunk))
    coords["filled"] = ("image", _filled_flags(n_images, filled))
    attrs = {WRITER_ATTR: "predictions", FILLED_ATTR: [[int(a), int(b)] for a, b in filled], **attrs}
    ds = xr.Dataset(variables, coords=coords, attrs={k: _attr(v) for k, v in attrs.items()})
    encoding = {name: {"chunks": (chunk, *ds[name].shape[1:])} for name in (*variables, *_FLAGS)}
    with quiet_zarr():
        ds.to_zarr(
            url,
            mode="w",
            compute=False,
            consolidated=False,
            encoding=encoding,
            storage_options=options or None,
        )
    target = OutputTarget(url=url, variables=(*variables, "valid"), chunk=chunk, storage_options=options)
    target.open().create_array(
        MANIFEST, shape=(-(-n_images // chunk),), chunks=(1,), dtype="uint8", fill_value=0
    )
    return target


def open_results(url: str, *, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> xr.Dataset:
    """A dask-infer output as an xarray Dataset, in today's names whichever version wrote it.

    Outputs written before the ``category`` dim named it ``class``; that dim is renamed.

    Parameters
    ----------
    url
        The output store: a local path or an fsspec URL.
    storage_options
        fsspec options for a remote store.
    **kwargs
        Passed on to ``xarray.open_zarr`` (``chunks``, ``decode_times``, ...).
    """
    with quiet_zarr():
        ds = xr.open_zarr(url, storage_options=storage_options or None, **kwargs)
    return with_current_dims(ds)


def with_current_dims(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with an old output's ``class`` dim (and its index coordinate) renamed ``category``."""
    if LEGACY_CATEGORY_DIM in ds.dims and CATEGORY_DIM not in ds.dims:
        return ds.rename({LEGACY_CATEGORY_DIM: CATEGORY_DIM})
    return ds


def open_output(
    url: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[OutputTarget, dict[str, Any]]:
    """An existing output to resume, and its attrs.

    Raises
    ------
    InputError
        When ``url`` is not an output dask-infer wrote with a completion manifest.
    """
    options = dict(storage_options or {})
    try:
        group = OutputTarget(url, (), 1, options).open("r")
        group[MANIFEST]
    except Exception as exc:  # a missing store, group or manifest: all say the same to the user
        raise InputError(
            f"output {url!r} holds no run to resume (no {MANIFEST} manifest); run without --resume"
        ) from exc
    variables = tuple(name for name in _RESULTS if name in group)
    chunk = int(group[variables[0]].chunks[0])  # type: ignore[union-attr]
    return OutputTarget(url, variables, chunk, options), dict(group.attrs)


def done_chunks(target: OutputTarget) -> set[int]:
    """Indices of the chunks whose results the manifest records as written."""
    flags = np.asarray(target.open("r")[MANIFEST][:])  # type: ignore[index]
    return {int(i) for i in np.flatnonzero(flags)}


def _filled_flags(n_images: int, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    flags = np.zeros(n_images, dtype=bool)
    for start, stop in ranges:
        flags[start:stop] = True
    return flags


def invalid_images(target: OutputTarget) -> int:
    """Images of the output whose ``valid`` flag is false (0 for an output without the flag)."""
    if "valid" not in target.variables:
        return 0
    return int(np.count_nonzero(~np.asarray(target.open("r")["valid"][:])))  # type: ignore[index]


def _attr(value: Any) -> Any:
    """Zarr attrs must be JSON: nested configs are stored as JSON text."""
    return json.dumps(value) if isinstance(value, dict) else value


@lru_cache(maxsize=16)
def _cached_arrays(url: str, options_json: str, token: str, names: tuple[str, ...]) -> dict[str, zarr.Array]:
    """The arrays ``names`` of the output at ``url``, opened once per process and opening.

    Looking an array up in its group reads its metadata again; a chunk writes several.
    ``token`` is new for every :class:`OutputTarget` made, so a later run that replaced
    the store never writes through arrays opened for an earlier one.
    """
    options = json.loads(options_json)
    kwargs: dict[str, Any] = {"mode": "r+"}
    if options:
        kwargs["storage_options"] = options
    group = zarr.open_group(store=url, **kwargs)
    return {name: group[name] for name in names}  # type: ignore[misc]


def write_chunk(target: OutputTarget, start: int, stop: int, result: dict[str, np.ndarray]) -> int:
    """Write one task's results into images ``start:stop``; returns the image count."""
    arrays = _cached_arrays(
        target.url,
        json.dumps(target.storage_options, sort_keys=True),
        target.token,
        (*target.variables, MANIFEST),
    )
    for name in target.variables:
        values = result[name]
        if values.shape[0] != stop - start:
            raise RuntimeError(f"{name} for images {start}:{stop} has {values.shape[0]} rows")
        arrays[name][start:stop] = values
    # Only after every variable is written: a chunk marked done is a chunk complete on disk.
    arrays[MANIFEST][start // target.chunk] = 1
    return stop - start


def finalize_output(target: OutputTarget, attrs: dict[str, Any]) -> None:
    """Record the run's summary in attrs and consolidate metadata for fast opening."""
    kwargs: dict[str, Any] = {"mode": "r+"}
    if target.storage_options:
        kwargs["storage_options"] = target.storage_options
    group = zarr.open_group(store=target.url, **kwargs)
    group.attrs.update({k: _attr(v) for k, v in attrs.items()})
    with quiet_zarr():
        zarr.consolidate_metadata(group.store)
