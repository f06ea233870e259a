"""Zarr store locations: local paths and fsspec URLs, existence, identity, and safe replacement.

dask-infer only ever deletes what it wrote itself: every store it creates carries the
``dask_infer_writer`` attribute, and :func:`replace_store` refuses anything else but an
empty folder.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
import zarr

from dask_infer.errors import InputError

__all__ = [
    "WRITER_ATTR",
    "absolute_location",
    "check_replaceable",
    "is_url",
    "normalise_location",
    "open_store_node",
    "replace_store",
    "store_exists",
]

WRITER_ATTR = "dask_infer_writer"
"""Attribute on every store dask-infer writes: what wrote it (``predictions``, ``dataset``)."""

_LOCAL_PROTOCOLS = ("file://", "local://")


def is_url(location: str) -> bool:
    """Whether ``location`` names an fsspec protocol (``s3://``, ``memory://``, ...)."""
    return "://" in location


def _local_path(location: str) -> str | None:
    """The local path ``location`` names (a path, or a ``file://`` URL), else ``None``."""
    for prefix in _LOCAL_PROTOCOLS:
        if location.lower().startswith(prefix):
            return location[len(prefix) :]
    return None if is_url(location) else location


def normalise_location(location: str) -> str:
    """What ``location`` is, for comparing two: a real absolute path, or the URL without trailing slashes.

    ``file:///a/b``, ``/a/b/``, ``b`` (in ``/a``) and a symlink to ``/a/b`` all give ``/a/b``.
    """
    local = _local_path(location)
    if local is None:
        protocol, _, rest = location.partition("://")
        return f"{protocol.lower()}://{rest.rstrip('/')}"
    return os.path.realpath(os.path.abspath(os.path.expanduser(local)))


def absolute_location(location: str) -> str:
    """``location`` with a relative local path made absolute here, so workers anywhere read the same."""
    if is_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def store_exists(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether something exists at ``location``."""
    if not is_url(location):
        return os.path.exists(os.path.expanduser(location))
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    return bool(fs.exists(path))


def open_store_node(location: str, storage_options: dict[str, Any] | None = None) -> zarr.Array | zarr.Group:
    """Open the Zarr array or group at ``location`` read-only (v2 or v3)."""
    kwargs: dict[str, Any] = {"mode": "r"}
    if is_url(location) and storage_options:
        kwargs["storage_options"] = storage_options
    target = location if is_url(location) else os.path.expanduser(location)
    try:
        return zarr.open(store=target, **kwargs)
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{location!r} is not a readable Zarr store: {exc}") from exc
    except Exception as exc:
        if exc.__class__.__name__ in ("NodeNotFoundError", "GroupNotFoundError", "ArrayNotFoundError"):
            raise InputError(f"{location!r} is not a Zarr store") from exc
        raise


def _filesystem(location: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    local = _local_path(location)
    target = os.path.expanduser(local) if local is not None and not is_url(location) else location
    return fsspec.core.url_to_fs(target, **(storage_options or {}))


def _not_ours(location: str, storage_options: dict[str, Any] | None) -> str | None:
    """What the thing at ``location`` is when dask-infer may not replace it; ``None`` when it may."""
    if not store_exists(location, storage_options):
        return None
    fs, path = _filesystem(location, storage_options)
    if fs.isfile(path):
        return "a file"
    entries = fs.ls(path, detail=False)
    if not entries:
        return None
    try:
        node = open_store_node(location, storage_options)
    except InputError:
        return (
            f"a folder of {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that is not a Zarr store"
        )
    attrs = dict(node.attrs)
    # Outputs of earlier versions carry only their completion flag.
    if WRITER_ATTR in attrs or "dask_infer_complete" in attrs:
        return None
    return "a Zarr store that dask-infer did not write"


def check_replaceable(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Raise unless ``location`` holds nothing, an empty folder, or a store dask-infer wrote.

    Raises
    ------
    InputError
        Naming what is there and the fix; nothing is touched.
    """
    what = _not_ours(location, storage_options)
    if what is not None:
        raise InputError(
            f"{location!r} is {what}; --overwrite replaces only stores dask-infer wrote, or an empty "
            "folder: choose another path, or remove it yourself"
        )


def replace_store(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the store at ``location`` before writing it anew, if :func:`check_replaceable` allows."""
    check_replaceable(location, storage_options)
    fs, path = _filesystem(location, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
