"""Whether a run can write where it was told to, checked before any cluster starts.

Nothing is created or probed: a local path is judged by the nearest part of it that
exists (a folder this process may write into, on a file system mounted read-write).
Remote fsspec URLs are not checked here; their stores say so when written.
"""

from __future__ import annotations

import os

from dask_infer.errors import InputError
from dask_infer.io.stores import is_url

__all__ = ["check_file_writable", "check_run_targets", "check_store_writable"]

_LOCAL_PREFIXES = ("file://", "local://")


def _local(location: str) -> str | None:
    """The absolute local path ``location`` names, ``None`` for a remote URL."""
    for prefix in _LOCAL_PREFIXES:
        if location.lower().startswith(prefix):
            location = location[len(prefix) :]
            break
    else:
        if is_url(location):
            return None
    return os.path.abspath(os.path.expanduser(location))


def _nearest_existing(path: str) -> str:
    """``path`` itself, or its closest ancestor that exists."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _folder_problem(folder: str) -> str | None:
    """Why new entries cannot be made in ``folder`` (which exists), or ``None`` when they can."""
    if not os.path.isdir(folder):
        return f"{folder!r} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"this user may not write in the folder {folder!r}"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return f"the folder {folder!r} is on a read-only file system"
    except OSError:
        pass
    return None


def _problem(path: str) -> str | None:
    """Why ``path`` (local, absent) cannot be created; ``None`` when its nearest folder allows it."""
    return _folder_problem(_nearest_existing(path))


def check_store_writable(name: str, location: str) -> None:
    """Raise unless the Zarr store at ``location`` could be created or written here.

    Parameters
    ----------
    name
        The option that named it (``output``), for the message.
    location
        A local path, ``file://`` URL, or remote fsspec URL (not checked).

    Raises
    ------
    InputError
        Naming the value, what is in the way and the fix.
    """
    path = _local(location)
    if path is None:
        return
    if os.path.isdir(path):
        problem = _folder_problem(path)
    elif os.path.lexists(path):
        return  # a file: refused, or replaced under --overwrite, by the output checks
    else:
        problem = _problem(path)
    if problem is not None:
        raise InputError(f"{name} {location!r} cannot be written: {problem}; choose a path you can write to")


def check_file_writable(name: str, location: str) -> None:
    """Raise unless a file could be written at ``location`` (missing folders are created then).

    Parameters
    ----------
    name
        The option that named it (``summary``, ``report``), for the message.
    location
        A local path, or a remote fsspec URL (not checked).

    Raises
    ------
    InputError
        For a path that is a folder, a file this user may not replace, or one whose
        folders cannot be made; naming the value and the fix.
    """
    path = _local(location)
    if path is None:
        return
    if os.path.isdir(path):
        problem: str | None = "it is a folder"
    elif os.path.lexists(path):
        writable = os.access(path, os.W_OK)
        problem = None if writable else "this user may not replace that file"
    else:
        problem = _problem(path)
    if problem is not None:
        raise InputError(
            f"{name} {location!r} cannot be written: {problem}; give the path of a file to write, "
            "in a folder you can write to"
        )


def check_run_targets(output: str, *, summary: str | None = None, report: str | None = None) -> None:
    """Raise unless a run could write its ``output`` store and its ``summary`` and ``report`` files."""
    check_store_writable("output", output)
    for name, path in (("summary", summary), ("report", report)):
        if path is not None:
            check_file_writable(name, path)
