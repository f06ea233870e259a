"""Which axis of a stored image array is the image, y, x and channel axis, from its dim names.

``dims`` maps roles to the array's own dim names (``{"image": "time", "channel": "band"}``
for a Pangeo-style ``(time, band, y, x)`` array); roles it leaves out are found by their
usual names, or are the one dim left. The result is a layout (``NHWC``, ``NCHW``, ``NHW``)
that reads turn into ``(image, y, x, channel)``; the store itself is never renamed.
"""

from __future__ import annotations

from collections.abc import Mapping

from dask_infer.errors import InputError
from dask_infer.input_options import DIM_ROLES

__all__ = ["ROLE_NAMES", "layout_from_dims"]

ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "image": ("image", "images", "time", "sample", "samples", "n"),
    "y": ("y", "lat", "latitude", "row", "rows", "height"),
    "x": ("x", "lon", "longitude", "col", "cols", "column", "columns", "width"),
    "channel": ("channel", "channels", "c", "band", "bands", "rgb"),
}
"""Dim names taken for each role when ``dims`` does not name it."""


def _shown(mapping: Mapping[str, str]) -> str:
    return ",".join(f"{role}={dim}" for role, dim in mapping.items())


def layout_from_dims(
    label: str, names: tuple[str, ...] | None, shape: tuple[int, ...], mapping: Mapping[str, str]
) -> str:
    """The layout of array ``label`` with dim ``names`` and ``shape`` under the role ``mapping``.

    Raises
    ------
    InputError
        When the array has no dim names, ``mapping`` names a dim it lacks, a dim's role
        cannot be told, or the image axis is not first or y and x are not adjacent.
    """
    given = _shown(mapping)
    if names is None:
        raise InputError(
            f"dims={given!r} but array {label!r} (shape {shape}) has no dim names; "
            "give the axis order with --layout NHWC or NCHW instead"
        )
    for role, dim in mapping.items():
        if dim not in names:
            raise InputError(
                f"dims={given!r} maps {role} to {dim!r}, but array {label!r} has no dim {dim!r}; "
                f"its dims are {', '.join(names)}"
            )
    roles = {dim: role for role, dim in mapping.items()}
    wanted = [r for r in DIM_ROLES if r not in mapping and (r != "channel" or len(names) == 4)]
    for role in list(wanted):
        found = [d for d in names if d not in roles and d.lower() in ROLE_NAMES[role]]
        if len(found) == 1:
            roles[found[0]] = role
            wanted.remove(role)
    left = [d for d in names if d not in roles]
    if len(left) == 1 and len(wanted) == 1:
        roles[left[0]] = wanted.pop()
        left = []
    if left or wanted:
        raise InputError(
            f"dims={given!r}: cannot tell the role of dim(s) {', '.join(left) or '?'} of array {label!r} "
            f"(dims {', '.join(names)}); map every role, e.g. --dims "
            f"image={names[0]},y=...,x=...{',channel=...' if len(names) == 4 else ''}"
        )
    order = tuple(roles[d] for d in names)
    layouts = {
        ("image", "y", "x", "channel"): "NHWC",
        ("image", "channel", "y", "x"): "NCHW",
        ("image", "y", "x"): "NHW",
    }
    if order not in layouts:
        raise InputError(
            f"array {label!r} has dims {', '.join(names)}, which are ({', '.join(order)}); the image dim "
            "must come first and the channel dim first or last of the rest: (image, y, x, channel) or "
            "(image, channel, y, x)"
        )
    return layouts[order]
