"""Store locations: local paths and fsspec URLs compared, found, opened, and replaced only when ours."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from dask_infer.errors import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.stores import (
    WRITER_ATTR,
    absolute_location,
    is_url,
    normalise_location,
    open_store_node,
    replace_store,
    store_exists,
)


def test_locations_compare_after_normalising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert normalise_location("real") == normalise_location(str(tmp_path / "real") + "/")
    assert normalise_location("link") == normalise_location("real")
    assert normalise_location("memory://a/b/") == "memory://a/b"
    assert is_url("s3://bucket/x.zarr") and not is_url(str(tmp_path))


def test_existence_and_opening_local_and_fsspec(tmp_path: Path) -> None:
    path = tmp_path / "g.zarr"
    assert not store_exists(str(path)) and not store_exists("memory://nothing-here.zarr")
    group = zarr.open_group(str(path), mode="w")
    group.create_array("x", shape=(2,), dtype="uint8")
    zarr.open_group("memory://there.zarr", mode="w").create_array("y", shape=(3,), dtype="uint8")
    assert store_exists(str(path)) and store_exists("memory://there.zarr")
    assert isinstance(open_store_node(str(path)), zarr.Group)
    assert open_store_node("memory://there.zarr")["y"].shape == (3,)  # type: ignore[index]
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError):
        open_store_node(str(tmp_path / "plain"))


def test_file_urls_name_the_same_store_as_their_path(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    assert normalise_location(f"file://{path}") == normalise_location(str(path)) == str(path.resolve())
    assert normalise_location("S3://bucket/x.zarr/") == "s3://bucket/x.zarr"
    assert absolute_location("rel.zarr") == os.path.abspath("rel.zarr")
    assert absolute_location("s3://b/rel.zarr") == "s3://b/rel.zarr"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_only_what_dask_infer_wrote_is_replaced(tmp_path: Path) -> None:
    thesis = tmp_path / "project"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(2,), dtype="uint8")
    before = {p: _tree(p) if p.is_dir() else p.read_bytes() for p in (thesis, plain, foreign)}
    for path, what in [
        (thesis, "a folder of 1 entry that is not a Zarr store"),
        (plain, "a file"),
        (foreign, "a Zarr store that dask-infer did not write"),
    ]:
        with pytest.raises(
            InputError, match=rf"is {what}; --overwrite replaces only stores dask-infer wrote"
        ):
            replace_store(str(path))
        with pytest.raises(InputError, match="remove it yourself"):
            replace_store(f"file://{path}")
    assert before == {p: _tree(p) if p.is_dir() else p.read_bytes() for p in (thesis, plain, foreign)}

    empty = tmp_path / "empty"
    empty.mkdir()
    ours = tmp_path / "ours.zarr"
    write_image_dataset(str(ours), np.zeros((2, 8, 8, 3), dtype=np.uint8))
    assert zarr.open_group(str(ours), mode="r").attrs[WRITER_ATTR] == "dataset"
    for path in (empty, ours, tmp_path / "nothing-there"):
        replace_store(str(path))
        assert not path.exists()
