"""open_images / describe_source / read_chunk on real Zarr stores (v2 and v3)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from dask_infer import InputError, open_images
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.images import describe_source, read_chunk
from tests.conftest import random_images


def test_dataset_opens_lazily_with_coords(small_dataset: Path) -> None:
    arr = open_images(str(small_dataset))
    assert arr.dims == ("image", "y", "x", "channel")
    assert isinstance(arr.data, da.Array) and arr.data.chunks[0][0] == 16
    assert arr.attrs["class_names"][0] == "k0"
    np.testing.assert_array_equal(arr["label"].values, np.arange(200) % 10)
    want = zarr.open_group(str(small_dataset), mode="r")["images"][20:40]
    np.testing.assert_array_equal(arr[20:40].values, want)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_channel_first_float_array(tmp_path: Path, zarr_format: int) -> None:
    images = random_images(10, seed=1)
    path = tmp_path / "nchw.zarr"
    z = zarr.create_array(
        str(path), shape=(10, 3, 32, 32), chunks=(4, 3, 32, 32), dtype="float32", zarr_format=zarr_format
    )
    z[:] = images.transpose(0, 3, 1, 2) / 255.0
    source = describe_source(str(path))
    assert source.layout == "NCHW" and source.zarr_format == zarr_format and source.storage_chunk == 4
    np.testing.assert_allclose(read_chunk(source, 4, 8), images[4:8] / 255.0, rtol=1e-6)
    assert open_images(str(path)).shape == (10, 32, 32, 3)


def test_grayscale_without_channel_axis(tmp_path: Path) -> None:
    path = tmp_path / "gray.zarr"
    z = zarr.create_array(str(path), shape=(6, 16, 16), chunks=(3, 16, 16), dtype="uint8")
    z[:] = 7
    assert read_chunk(describe_source(str(path)), 0, 3).shape == (3, 16, 16, 1)


def _store(tmp_path: Path, shape: tuple[int, ...], dtype: str = "uint8", name: str = "images") -> str:
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array(name, shape=shape, dtype=dtype)
    return str(tmp_path / "s.zarr")


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((10, 32), "uint8", "has 2 dims"),
        ((2, 2, 8, 8, 3), "uint8", "has 5 dims"),
        ((4, 8, 8, 3), "int32", "dtype int32"),
        ((4, 8, 8, 3), "bool", "dtype bool"),
        ((4, 5, 8, 7), "uint8", "cannot tell the channel axis"),
        ((0, 8, 8, 3), "uint8", "holds no images"),
    ],
)
def test_bad_arrays(tmp_path: Path, shape: tuple[int, ...], dtype: str, match: str) -> None:
    url = _store(tmp_path, shape, dtype)
    if len(shape) == 2:
        match = "no image array"
    with pytest.raises(InputError, match=match):
        describe_source(url)


def test_missing_and_ambiguous_stores(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        describe_source(str(tmp_path / "nope.zarr"))
    (tmp_path / "notzarr").mkdir()
    with pytest.raises(InputError):
        describe_source(str(tmp_path / "notzarr"))
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(2, 8, 8, 3), dtype="uint8")
    group.create_array("b", shape=(2, 8, 8, 3), dtype="uint8")
    with pytest.raises(InputError, match="several image arrays"):
        describe_source(str(tmp_path / "two.zarr"))
    assert describe_source(str(tmp_path / "two.zarr"), variable="b").variable == "b"
    with pytest.raises(InputError, match="no array 'c'"):
        describe_source(str(tmp_path / "two.zarr"), variable="c")


def test_fsspec_memory_url() -> None:
    images = random_images(8, seed=2)
    write_image_dataset("memory://imgs.zarr", images, chunk=4, overwrite=True)
    source = describe_source("memory://imgs.zarr")
    np.testing.assert_array_equal(read_chunk(source, 0, 8), images)


def test_refuses_existing_dataset(tmp_path: Path) -> None:
    write_image_dataset(str(tmp_path / "d.zarr"), random_images(2))
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        write_image_dataset(str(tmp_path / "d.zarr"), random_images(2))


def test_any_channel_count_and_mapped_dims(tmp_path: Path) -> None:
    """Six bands are read as they are; dims maps roles to other names; a bad mapping names the dims."""
    group = zarr.open_group(str(tmp_path / "ms.zarr"), mode="w")
    pixels = np.arange(2 * 6 * 4 * 5, dtype=np.uint16).reshape(2, 6, 4, 5)
    arr = group.create_array(
        "cube", shape=pixels.shape, dtype="uint16", dimension_names=("t", "b", "row", "col")
    )
    arr[:] = pixels
    with pytest.raises(InputError, match="cannot tell the channel axis .* map the dims"):
        describe_source(str(tmp_path / "ms.zarr"))
    source = describe_source(str(tmp_path / "ms.zarr"), dims={"image": "t", "channel": "b"})
    assert (source.layout, source.image_shape) == ("NCHW", (4, 5, 6))
    np.testing.assert_array_equal(read_chunk(source, 0, 2, pooled=False), pixels.transpose(0, 2, 3, 1))
    with pytest.raises(InputError, match="has no dim 'band'; its dims are t, b, row, col"):
        describe_source(str(tmp_path / "ms.zarr"), dims={"channel": "band"})
    with pytest.raises(InputError, match="layout='NHWC' but the dims"):
        describe_source(str(tmp_path / "ms.zarr"), layout="NHWC", dims={"image": "t", "channel": "b"})
    nameless = zarr.open_group(str(tmp_path / "n.zarr"), mode="w")
    nameless.create_array("images", shape=(2, 4, 4, 6), dtype="uint8")
    assert describe_source(str(tmp_path / "n.zarr"), layout="NHWC").image_shape == (4, 4, 6)
    with pytest.raises(InputError, match="has no dim names; give the axis order with --layout"):
        describe_source(str(tmp_path / "n.zarr"), dims={"channel": "band"})
