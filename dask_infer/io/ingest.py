"""Turn a folder of JPEG/PNG files (one subfolder per class) into a Zarr image dataset."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from PIL import Image

from dask_infer.errors import InputError
from dask_infer.io.outputs import quiet_zarr
from dask_infer.io.stores import WRITER_ATTR, replace_store, store_exists

__all__ = ["IMAGE_SUFFIXES", "find_images", "ingest_folder", "load_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(folder: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and class names, as torchvision's ImageFolder orders them."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"input folder {str(folder)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(
            f"folder {str(folder)!r} has no class subfolders; put each class's images in its own subfolder"
        )
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                files.append(path)
                labels.append(index)
    if not files:
        raise InputError(
            f"folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files in its class subfolders"
        )
    return files, labels, classes


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to ``size`` and centre-crop a square."""
    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize(
                (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR
            )
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except OSError as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}") from exc


def ingest_folder(
    folder: str | Path,
    output: str,
    *,
    size: int = 224,
    chunk: int = 64,
    threads: int = 8,
    overwrite: bool = False,
) -> xr.Dataset:
    """Write every image under ``folder`` into a Zarr dataset, one chunk at a time.

    Parameters
    ----------
    folder
        One subfolder per class, as ``torchvision.datasets.ImageFolder`` reads.
    output
        Zarr store to create: ``images`` (image, y, x, channel) uint8 RGB, coordinates
        ``label`` and ``path``, and ``class_names`` in attrs.
    size
        Output height and width.
    chunk
        Images per storage chunk; one chunk is decoded and written at a time.
    threads
        Decoding threads.
    overwrite
        Replace an existing store that dask-infer wrote (or an empty folder); anything
        else is refused.
    """
    if size < 8:
        raise InputError(f"size={size} is too small; use >= 8")
    files, labels, classes = find_images(folder)
    if store_exists(output) and not overwrite:
        raise InputError(f"output {output!r} exists; pass --overwrite to replace it")
    if overwrite:
        replace_store(output)
    n = len(files)
    root = Path(folder)
    import dask.array as da

    template = xr.Dataset(
        {
            "images": (
                ("image", "y", "x", "channel"),
                da.zeros((n, size, size, 3), dtype="uint8", chunks=(chunk, -1, -1, -1)),
            )
        },
        coords={
            "image": np.arange(n, dtype=np.int64),
            "label": ("image", np.asarray(labels, dtype=np.int64)),
            "path": ("image", np.asarray([str(f.relative_to(root)) for f in files], dtype=str)),
        },
        attrs={WRITER_ATTR: "dataset", "class_names": classes, "description": f"ingested from {root.name}"},
    )
    encoding: dict[str, Any] = {"images": {"chunks": (chunk, size, size, 3)}}
    with quiet_zarr():
        template.to_zarr(output, mode="w", compute=False, encoding=encoding, consolidated=False)
        # Every chunk stored, all-black ones too: a run refuses absent chunks as possibly lost.
        with zarr.config.set({"array.write_empty_chunks": True}):
            array = zarr.open_group(output, mode="r+")["images"]
        with ThreadPoolExecutor(threads) as pool:
            for start in range(0, n, chunk):
                batch = list(pool.map(lambda f: load_image(f, size), files[start : start + chunk]))
                array[start : start + len(batch)] = np.stack(batch)  # type: ignore[index]
        zarr.consolidate_metadata(output)
    return xr.open_zarr(output)
