"""Sample datasets and folder ingest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from dask_infer import InputError, write_sample
from dask_infer.io.ingest import ingest_folder


def test_digits_sample(tmp_path: Path) -> None:
    ds = write_sample(str(tmp_path / "d.zarr"), size=24, count=100)
    assert ds["images"].shape == (100, 24, 24, 1) and ds["images"].dtype == np.uint8
    assert set(np.unique(ds["label"].values)) <= set(range(10))
    assert 0 < int(ds["held_out"].sum()) < 100
    assert ds.attrs["class_names"] == [str(d) for d in range(10)]


def test_photos_sample(tmp_path: Path) -> None:
    ds = write_sample(str(tmp_path / "p.zarr"), kind="photos", size=40, count=5)
    assert ds["images"].shape == (5, 40, 40, 3) and ds.attrs["class_names"] == ["china", "flower"]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"kind": "cats"}, "unknown sample kind"), ({"count": 5000}, "count=5000")]
)
def test_sample_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        write_sample(str(tmp_path / "x.zarr"), **kwargs)


def test_ingest_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = {}
    for cls, shape in (("cat", (40, 60, 3)), ("dog", (50, 50))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            suffix = ".png" if cls == "dog" else ".jpg"
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}{suffix}")
            expected[f"{cls}/{i}{suffix}"] = pixels
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    ingest_folder(tmp_path / "imgs", str(tmp_path / "out.zarr"), size=32, chunk=4)
    ds = xr.open_zarr(tmp_path / "out.zarr")
    assert ds["images"].shape == (6, 32, 32, 3)
    assert ds.attrs["class_names"] == ["cat", "dog"]
    np.testing.assert_array_equal(ds["label"].values, [0, 0, 0, 1, 1, 1])
    assert list(ds["path"].values) == sorted(expected)
    gray = expected["dog/0.png"]
    np.testing.assert_array_equal(ds["images"][3].values[..., 0], ds["images"][3].values[..., 2])
    assert abs(float(ds["images"][3].values[..., 0].mean()) - float(gray.mean())) < 8


def test_ingest_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ingest_folder(tmp_path / "none", str(tmp_path / "o.zarr"))
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(InputError, match="no class subfolders"):
        ingest_folder(tmp_path / "flat", str(tmp_path / "o.zarr"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no"):
        ingest_folder(tmp_path / "empty", str(tmp_path / "o.zarr"))
