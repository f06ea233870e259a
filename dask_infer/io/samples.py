"""Embedded sample datasets, built from data that ships with scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.nn import functional as F

from dask_infer.errors import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.options import check_positive_int

__all__ = ["SAMPLE_KINDS", "digits_images", "digits_split", "photo_crops", "write_sample"]

SAMPLE_KINDS = ("digits", "photos")


def digits_split(n: int, *, held_out_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out images: a fixed, seeded draw shared by data and model."""
    order = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[: int(round(n * held_out_fraction))]] = True
    return mask


def digits_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits upscaled to ``size`` x ``size``, uint8 (N, y, x, 1)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images), digits.target.astype(np.int64)


def photo_crops(size: int, count: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops of scikit-learn's two sample photos, resized to ``size``, RGB uint8."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        label = int(rng.integers(len(photos)))
        photo = photos[label]
        side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2]) + 1))
        y0 = int(rng.integers(0, photo.shape[0] - side + 1))
        x0 = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = (
            torch.from_numpy(np.ascontiguousarray(photo[y0 : y0 + side, x0 : x0 + side]))
            .permute(2, 0, 1)[None]
            .float()
        )
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i] = crop[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        labels[i] = label
    return out, labels


def write_sample(
    output: str,
    *,
    kind: str = "digits",
    size: int = 224,
    count: int | None = None,
    chunk: int = 64,
    overwrite: bool = False,
) -> xr.Dataset:
    """Write an embedded sample dataset to a Zarr store.

    Parameters
    ----------
    output
        Zarr store to create.
    kind
        ``"digits"``: scikit-learn's handwritten digits, grayscale, labels 0-9 and a
        ``held_out`` flag (the images the demo model never trained on). ``"photos"``:
        crops of scikit-learn's two sample photos, RGB, labelled by photo.
    size
        Height and width of every image.
    count
        Number of images (digits: at most 1,797; default all; photos: default 64).
    chunk
        Images per storage chunk.
    overwrite
        Replace an existing store.

    Returns
    -------
    xarray.Dataset
        What was written (lazily reopened from the store).
    """
    if kind not in SAMPLE_KINDS:
        raise InputError(f"unknown sample kind {kind!r}; choose one of {', '.join(SAMPLE_KINDS)}")
    if size < 8:
        raise InputError(f"size={size} is too small; use >= 8")
    attrs: dict[str, Any]
    if kind == "digits":
        images, labels = digits_images(size)
        held_out = digits_split(len(labels))
        n = len(labels) if count is None else count
        if not 1 <= n <= len(labels):
            raise InputError(f"count={count} must lie in 1..{len(labels)} for the digits sample")
        extra = {"held_out": held_out[:n]}
        images, labels = images[:n], labels[:n]
        attrs = {"class_names": [str(d) for d in range(10)], "description": "scikit-learn digits"}
    else:
        n = check_positive_int("count", 64 if count is None else count, error=InputError)
        images, labels = photo_crops(size, n)
        extra = {}
        attrs = {"class_names": ["china", "flower"], "description": "crops of scikit-learn sample photos"}
    return write_image_dataset(
        output, images, labels=labels, extra_coords=extra, attrs=attrs, chunk=chunk, overwrite=overwrite
    )
