"""Absent input chunks: found with one listing, refused by default naming them, read as fill on request."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client
from PIL import Image

from dask_infer.errors import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.images import check_missing_chunks, describe_source, find_missing_chunks
from dask_infer.io.ingest import ingest_folder
from dask_infer.io.outputs import FILLED_ATTR
from tests.conftest import random_images
from tests.reference import assert_close_logits, reference_logits, run_small

CHUNK = 16


def _write_v2(path: Path, images: np.ndarray) -> None:
    """A Zarr v2 dataset of ``images`` in chunks of ``CHUNK``, every chunk stored."""
    ds = xr.Dataset({"images": (("image", "y", "x", "channel"), images)})
    ds.to_zarr(
        path,
        zarr_format=2,
        consolidated=False,
        encoding={"images": {"chunks": (CHUNK, *images.shape[1:]), "write_empty_chunks": True}},
    )


def _chunk_file(store: Path, index: int) -> Path:
    """The file of storage chunk ``index`` (along images) of the ``images`` array, v2 or v3 keys."""
    v3 = store / "images" / "c" / str(index) / "0" / "0" / "0"
    return v3 if v3.exists() else store / "images" / f"{index}.0.0.0"


def _snapshot(store: Path) -> dict[str, str]:
    """Every file of ``store`` and a hash of its bytes."""
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(params=[3, 2], ids=["zarr-v3", "zarr-v2"])
def holed(request: pytest.FixtureRequest, small_dataset: Path, tmp_path: Path) -> Path:
    """The small dataset (v3, or the same images as v2) with storage chunk 2 (images 32-47) deleted."""
    path = tmp_path / "holed.zarr"
    if request.param == 3:
        shutil.copytree(small_dataset, path)
    else:
        _write_v2(path, zarr.open_group(str(small_dataset), mode="r")["images"][:])
    _chunk_file(path, 2).unlink()
    return path


def test_absent_chunks_are_found_in_v2_and_v3_keys(holed: Path) -> None:
    missing = find_missing_chunks(describe_source(str(holed)))
    assert missing.chunks == ((2, 0, 0, 0),) and missing.total == 13
    assert missing.image_ranges == ((32, 48),) and missing.n_filled == 16
    assert "1 of 13 storage chunks" in missing.describe() and "images 32-47" in missing.describe()


def test_a_complete_store_has_none_missing(small_dataset: Path) -> None:
    missing = find_missing_chunks(describe_source(str(small_dataset)))
    assert missing.chunks == () and missing.image_ranges == () and missing.total == 13


def test_fsspec_store_and_the_last_partial_chunk() -> None:
    url = "memory://missing-chunks/data.zarr"
    group = zarr.open_group(url, mode="w")
    array = group.create_array("images", shape=(50, 4, 4, 3), chunks=(8, 4, 4, 3), dtype="float32")
    with zarr.config.set({"array.write_empty_chunks": True}):
        written = zarr.open_group(url, mode="r+")["images"]
        written[:40] = 1.0  # chunks 0-4 of 7; 5 and the partial 6 (images 48-49) stay absent
    assert array.nchunks == 7
    missing = find_missing_chunks(describe_source(url))
    assert [c[0] for c in missing.chunks] == [5, 6]
    assert missing.image_ranges == ((40, 50),) and missing.n_filled == 10


def test_refusal_names_chunks_counts_fill_value_and_the_fix(holed: Path) -> None:
    source = describe_source(str(holed))
    with pytest.raises(InputError) as caught:
        check_missing_chunks(source, "refuse")
    message = str(caught.value)
    assert "\n" not in message
    for part in ("1 of 13 storage chunks", "chunk 2,0,0,0 (images 32-47)", "fill value (0)",
                 "write_empty_chunks", "--missing-chunks fill"):  # fmt: skip
        assert part in message, part
    assert check_missing_chunks(source, "fill").image_ranges == ((32, 48),)


def test_many_absent_chunks_are_shown_by_the_first_few(tmp_path: Path) -> None:
    path = tmp_path / "sparse.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", shape=(100, 2, 2, 3), chunks=(1, 2, 2, 3), dtype="uint8")
    message = check_missing_chunks(describe_source(str(path)), "fill").describe()
    assert message.startswith("100 of 100 storage chunks") and "and 97 more" in message


def test_one_listing_for_a_hundred_thousand_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is listed once, never asked chunk by chunk; 100,000 chunks take well under seconds."""
    path = tmp_path / "big.zarr"
    group = zarr.open_group(str(path), mode="w")
    array = group.create_array("images", shape=(100_000, 2, 2, 3), chunks=(1, 2, 2, 3), dtype="uint8")
    with zarr.config.set({"array.write_empty_chunks": True}):
        written = zarr.open_group(str(path), mode="r+")["images"]
        written[:5] = 7
    assert array.nchunks == 100_000
    source = describe_source(str(path))
    calls: dict[str, int] = {"list_prefix": 0, "get": 0, "exists": 0}
    store_type = type(zarr.open_group(str(path), mode="r").store)
    for name in calls:
        original = getattr(store_type, name)

        def counted(self: Any, *args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(store_type, name, counted)
    start = time.perf_counter()
    missing = find_missing_chunks(source)
    seconds = time.perf_counter() - start
    assert calls["list_prefix"] == 1 and calls["exists"] == 0
    assert calls["get"] < 20  # opening the array reads metadata; no chunk is read
    assert len(missing.chunks) == 99_995 and missing.image_ranges == ((5, 100_000),)
    assert seconds < 10, seconds


def test_the_projects_writers_store_all_zero_chunks(tmp_path: Path) -> None:
    images = random_images(12, size=8)
    images[4:8] = 0
    write_image_dataset(str(tmp_path / "zeros.zarr"), images, chunk=4)
    assert find_missing_chunks(describe_source(str(tmp_path / "zeros.zarr"))).chunks == ()
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    ingest_folder(tmp_path / "imgs", str(tmp_path / "black.zarr"), size=8, chunk=2)
    assert find_missing_chunks(describe_source(str(tmp_path / "black.zarr"))).chunks == ()


def test_run_refuses_absent_chunks_and_leaves_the_input_alone(
    client: Client, holed: Path, small_weights: Path, tmp_path: Path
) -> None:
    before = _snapshot(holed)
    with pytest.raises(InputError, match=r"chunk 2,0,0,0 \(images 32-47\).*--missing-chunks fill"):
        run_small(client, holed, tmp_path / "out.zarr", small_weights)
    assert not (tmp_path / "out.zarr").exists()
    assert _snapshot(holed) == before


def test_run_with_fill_marks_the_filled_images_and_computes_the_rest(
    client: Client, holed: Path, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    before = _snapshot(holed)
    lines: list[str] = []
    summary = run_small(
        client, holed, tmp_path / "out.zarr", small_weights, missing_chunks="fill", echo=lines.append
    )
    assert _snapshot(holed) == before
    ds = xr.open_zarr(tmp_path / "out.zarr")
    filled = np.zeros(200, bool)
    filled[32:48] = True
    np.testing.assert_array_equal(ds["filled"].values, filled)
    assert list(ds.image.values[ds.filled.values]) == list(range(32, 48))
    assert ds["valid"].values.all()
    assert ds.attrs[FILLED_ATTR] == [[32, 48]]
    assert summary.filled_images == 16 and json.loads(ds.attrs["run_summary"])["filled_images"] == 16
    assert "16 image(s) read as the fill value" in summary.format()
    assert any(line.startswith("warning: 1 of 13 storage chunks") for line in lines)

    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    want = reference_logits(images, "resnet18", str(small_weights))
    got = ds["logits"].values
    assert_close_logits(got[~filled], want[~filled])
    zeros = reference_logits(np.zeros_like(images[32:48]), "resnet18", str(small_weights))
    assert_close_logits(got[filled], zeros)


def test_cli_refusal_is_exit_2_and_one_line(holed: Path, small_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.zarr"
    args = ["run", "--input", str(holed), "--output", str(out), "--model", "resnet18",
            "--weights", str(small_weights), "--no-progress"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "dask_infer.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1 of 13 storage chunks of input array"), (
        result.stderr
    )
    assert "--missing-chunks fill" in lines[0] and "Traceback" not in result.stderr
    assert not out.exists()
