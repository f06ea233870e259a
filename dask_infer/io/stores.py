"""Zarr store locations: local paths and fsspec URLs, existence and identity."""

from __future__ import annotations

import os
from typing import Any

import fsspec
import zarr

from dask_infer.errors import InputError

__all__ = ["is_url", "normalise_location", "open_store_node", "store_exists", "remove_store"]


def is_url(location: str) -> bool:
    """Whether ``location`` names an fsspec protocol (``s3://``, ``memory://``, ...)."""
    return "://" in location


def normalise_location(location: str) -> str:
    """Absolute local path, or the URL without a trailing slash, for comparisons."""
    if is_url(location):
        return location.rstrip("/")
    return os.path.realpath(os.path.abspath(os.path.expanduser(location)))


def store_exists(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether something exists at ``location``."""
    if not is_url(location):
        return os.path.exists(os.path.expanduser(location))
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    return bool(fs.exists(path))


def remove_store(location: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the store at ``location`` (used only for ``overwrite``)."""
    fs, path = fsspec.core.url_to_fs(
        location if is_url(location) else os.path.expanduser(location), **(storage_options or {})
    )
    if fs.exists(path):
        fs.rm(path, recursive=True)


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
