"""NaN and infinite pixels: counted per image, flagged ``valid=False``, no class claimed, summarised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client

from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.images import non_finite_pixels
from dask_infer.workflows.summary import RunSummary
from tests.conftest import random_images
from tests.reference import assert_close_logits, reference_logits, run_small

N = 64
BAD = {3: "one NaN pixel", 20: "one +inf pixel", 21: "one -inf pixel", 40: "all NaN"}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_non_finite_pixels_are_counted_per_image(dtype: str) -> None:
    images = np.zeros((70, 4, 4, 3), dtype=dtype)  # more images than one scanning block
    images[1, 0, 0, 0] = np.nan
    images[65, 1, 2] = np.inf
    images[66] = -np.inf
    counts = non_finite_pixels(images, block=64)
    want = np.zeros(70, np.int64)
    want[[1, 65, 66]] = [1, 3, 48]
    np.testing.assert_array_equal(counts, want)


def test_integer_images_are_not_scanned() -> None:
    images = np.full((3, 2, 2, 1), 255, np.uint8)
    np.testing.assert_array_equal(non_finite_pixels(images), [0, 0, 0])


def test_summary_line_names_invalid_images() -> None:
    summary = RunSummary(
        images=10, seconds=1.0, images_per_second=10.0, output="o.zarr", model="m", pretrained=True,
        chunks=1, chunk_size=10, workers=1, model_loads=1, cluster="c", dashboard=None, invalid_images=2,
    )  # fmt: skip
    first = summary.format().splitlines()[0]
    assert "2 invalid image(s) with NaN/inf pixels" in first and "top-k class -1" in first
    assert "invalid" not in RunSummary(**{**summary.to_dict(), "invalid_images": 0}).format()


@pytest.fixture(scope="module")
def float_images() -> np.ndarray:
    """Float32 images in [0, 1] that are exactly uint8 images / 255, before any pixel is spoiled."""
    return random_images(N).astype(np.float32) / np.float32(255)


@pytest.fixture(scope="module")
def spoiled(tmp_path_factory: pytest.TempPathFactory, float_images: np.ndarray) -> Path:
    """The float images with NaN or inf in the images of ``BAD``, as a Zarr dataset in chunks of 16."""
    images = float_images.copy()
    images[3, 5, 7, 1] = np.nan
    images[20, 0, 0, 0] = np.inf
    images[21, 31, 31, 2] = -np.inf
    images[40] = np.nan
    path = tmp_path_factory.mktemp("bad") / "spoiled.zarr"
    write_image_dataset(str(path), images, chunk=16)
    return path


def _bad() -> np.ndarray:
    flags = np.zeros(N, bool)
    flags[list(BAD)] = True
    return flags


def test_invalid_images_are_flagged_and_claim_no_class(
    client: Client, spoiled: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    summary = run_small(
        client, spoiled, out, small_weights, outputs=("logits", "probabilities", "top_k"), top_k=3
    )
    ds = xr.open_zarr(out)
    bad = _bad()
    np.testing.assert_array_equal(ds["valid"].values, ~bad)
    assert list(ds.image.values[~ds.valid.values]) == sorted(BAD)
    assert (ds["top_k_class"].values[bad] == -1).all()
    assert np.isnan(ds["top_k_probability"].values[bad]).all()
    assert (ds["top_k_class"].values[~bad] >= 0).all()
    assert np.isfinite(ds["top_k_probability"].values[~bad]).all()
    assert np.isfinite(ds["probabilities"].values[~bad]).all()
    assert summary.invalid_images == len(BAD) and not ds["filled"].values.any()
    assert ds.attrs["dask_infer_invalid_images"] == len(BAD)
    assert json.loads(ds.attrs["run_summary"])["invalid_images"] == len(BAD)
    assert f"{len(BAD)} invalid image(s)" in summary.format().splitlines()[0]


def test_other_images_match_the_reference(
    client: Client, spoiled: Path, small_weights: Path, tmp_path: Path
) -> None:
    run_small(client, spoiled, tmp_path / "out.zarr", small_weights)
    got = xr.open_zarr(tmp_path / "out.zarr")["logits"].values
    want = reference_logits(random_images(N), "resnet18", str(small_weights))
    bad = _bad()
    assert_close_logits(got[~bad], want[~bad])
    assert np.isnan(got[40]).all()  # an all-NaN image gives NaN logits: shown, not hidden


def test_a_pipeline_carries_the_flags_to_its_last_stage(
    client: Client, spoiled: Path, small_weights: Path, tmp_path: Path
) -> None:
    run_small(client, spoiled, tmp_path / "whole.zarr", small_weights, chunk_size=8)
    summary = run_small(
        client,
        spoiled,
        tmp_path / "pipe.zarr",
        small_weights,
        chunk_size=8,
        stages=2,
        balance="flops",
        placement="pipeline",
        rebalance=False,
    )
    assert summary.placement["mode"] == "pipeline" and summary.invalid_images == len(BAD)
    whole, pipe = xr.open_zarr(tmp_path / "whole.zarr"), xr.open_zarr(tmp_path / "pipe.zarr")
    np.testing.assert_array_equal(pipe["valid"].values, ~_bad())
    np.testing.assert_array_equal(pipe["top_k_class"].values, whole["top_k_class"].values)
    np.testing.assert_array_equal(pipe["logits"].values, whole["logits"].values)


def test_uint8_images_are_all_valid(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    summary = run_small(client, small_dataset, tmp_path / "out.zarr", small_weights, outputs=("logits",))
    ds = xr.open_zarr(tmp_path / "out.zarr")
    assert ds["valid"].values.all() and summary.invalid_images == 0
    assert ds.attrs["dask_infer_invalid_images"] == 0 and ds.attrs["dask_infer_filled_images"] == []
