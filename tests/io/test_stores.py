"""Store locations: local paths and fsspec URLs compared, found and opened."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

from dask_infer.errors import InputError
from dask_infer.io.stores import is_url, normalise_location, open_store_node, store_exists


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
