"""Output dims and coords: input coordinates kept exactly, a keyword-safe ``category`` dim, other shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from torch import nn

import dask_infer
from dask_infer import ModelError
from dask_infer.io.outputs import MANIFEST, create_output, open_results, write_chunk
from dask_infer.models.heads import probe_outputs
from tests.conftest import random_images
from tests.reference import assert_close_logits, reference_logits, run_small


def _write_with_coords(path: Path, images: np.ndarray, coords: dict[str, object]) -> xr.Dataset:
    ds = xr.Dataset({"images": (("image", "y", "x", "channel"), images)}, coords=coords)
    ds.to_zarr(path, mode="w", encoding={"images": {"chunks": (8, *images.shape[1:])}})
    return xr.open_zarr(path)


@pytest.mark.parametrize("kind", ["datetime", "string"])
def test_input_coordinates_keep_their_values_and_dtypes(
    client: Client, small_weights: Path, tmp_path: Path, kind: str
) -> None:
    images = random_images(24, seed=11)
    times = pd.date_range("2021-03-01", periods=24, freq="6h").values
    names = np.array([f"scene-{i:02d}" for i in range(24)])
    index = times if kind == "datetime" else names
    src = _write_with_coords(
        tmp_path / "in.zarr",
        images,
        {
            "image": index,
            "acquired": ("image", times),
            "scene": ("image", names),
            "cloud": ("image", np.linspace(0, 1, 24)),
        },
    )
    out = tmp_path / "out.zarr"
    run_small(client, tmp_path / "in.zarr", out, small_weights, chunk_size=8)
    got = xr.open_zarr(out)
    for name in ("image", "acquired", "scene", "cloud"):
        assert got[name].dtype == src[name].dtype, (name, got[name].dtype, src[name].dtype)
        np.testing.assert_array_equal(got[name].values, src[name].values)
    assert got.indexes["image"].equals(src.indexes["image"])
    assert_close_logits(got["logits"].values, reference_logits(images, "resnet18", str(small_weights)))
    picked = got["logits"].sel(image=index[5])
    np.testing.assert_array_equal(picked.values, got["logits"].values[5])


def test_class_scores_lie_on_a_keyword_safe_category_dim(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.zarr"
    run_small(client, small_dataset, out, small_weights, chunk_size=16, outputs=("logits", "probabilities"))
    ds = xr.open_zarr(out)
    assert ds["logits"].dims == ("image", "category") and ds["probabilities"].dims == ("image", "category")
    assert "class" not in ds.dims and ds["class_name"].dims == ("category",)
    np.testing.assert_array_equal(ds["logits"].sel(category=3).values, ds["logits"].values[:, 3])
    # the input's per-image ground truth keeps its own name beside it
    np.testing.assert_array_equal(ds["label"].values, np.arange(200) % 10)


def test_sigmoid_gives_multi_label_probabilities_and_ranks_them(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.zarr"
    run_small(
        client,
        small_dataset,
        out,
        small_weights,
        chunk_size=16,
        outputs=("probabilities", "top_k"),
        activation="sigmoid",
        top_k=3,
    )
    ds = xr.open_zarr(out)
    images = np.asarray(zarr.open_group(str(small_dataset), mode="r")["images"][:])
    want = torch.sigmoid(torch.from_numpy(reference_logits(images, "resnet18", str(small_weights)))).numpy()
    np.testing.assert_allclose(ds["probabilities"].values, want, atol=1e-5)
    assert not np.allclose(ds["probabilities"].values.sum(1), 1.0)
    top = np.argsort(-want, axis=1)[:, :3]
    assert (ds["top_k_class"].values[:, 0] == top[:, 0]).all()
    np.testing.assert_allclose(ds["top_k_probability"].values, np.take_along_axis(want, top, 1), atol=1e-5)
    assert json.loads(ds.attrs["dask_infer_run"])["activation"] == "sigmoid"


def _as_written_before_category(path: Path) -> None:
    """Rewrite an output's metadata as versions before the ``category`` dim wrote it: ``class``."""
    (path / "category").rename(path / "class")
    for meta in path.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if "dimension_names" in doc:
            doc["dimension_names"] = ["class" if n == "category" else n for n in doc["dimension_names"]]
        doc.pop("consolidated_metadata", None)
        meta.write_text(json.dumps(doc))
    zarr.consolidate_metadata(str(path))


def test_outputs_with_the_old_class_dim_open_renamed_and_resume(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.zarr"
    run_small(client, small_dataset, out, small_weights, chunk_size=16)
    _as_written_before_category(out)
    assert xr.open_zarr(out)["logits"].dims == ("image", "class")
    # interrupted after all but two chunks
    group = zarr.open_group(str(out), mode="r+")
    group[MANIFEST][3:5] = 0
    group["logits"][48:80] = 0
    group.attrs["dask_infer_complete"] = False
    resumed = run_small(client, small_dataset, out, small_weights, resume=True)
    assert resumed.skipped_chunks == 11 and resumed.images == 32
    images = np.asarray(zarr.open_group(str(small_dataset), mode="r")["images"][:])
    ds = dask_infer.open_results(str(out))
    assert ds["logits"].dims == ("image", "category") and ds.attrs["dask_infer_complete"] is True
    assert ds["class_name"].dims == ("category",)
    assert_close_logits(ds["logits"].values, reference_logits(images, "resnet18", str(small_weights)))
    np.testing.assert_array_equal(ds["logits"].sel(category=2).values, ds["logits"].values[:, 2])
    # a current output opens unchanged
    fresh = tmp_path / "fresh.zarr"
    run_small(client, small_dataset, fresh, small_weights, chunk_size=16)
    xr.testing.assert_identical(open_results(str(fresh)), xr.open_zarr(fresh))


class _Dense(nn.Module):
    """A dense map per image: (image, 2, 4, 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x[:, :2], 4)


class _Regression(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_outputs_of_other_shapes_get_their_own_dims(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"outputs of shape \(2, 4, 4\).*--activation none --outputs logits"):
        probe_outputs(_Dense(), (1, 3, 8, 8), activation="softmax")
    dense = probe_outputs(_Dense(), (1, 3, 8, 8), activation="none")
    assert dense.result == (2, 4, 4)
    assert probe_outputs(_Regression(), (1, 3, 8, 8), activation="none").result == (3,)
    for shape, dims in (((2, 4, 4), ("output_0", "output_1", "output_2")), ((3,), ("output",))):
        path = tmp_path / f"{len(shape)}.zarr"
        target = create_output(
            str(path),
            n_images=6,
            result_shape=shape,
            activation="none",
            top_k=1,
            chunk=3,
            outputs=("logits",),
            image_coords={},
            class_names=None,
            attrs={},
            overwrite=False,
        )
        values = np.arange(6 * int(np.prod(shape)), dtype=np.float32).reshape(6, *shape)
        for start in (0, 3):
            write_chunk(
                target, start, start + 3, {"logits": values[start : start + 3], "valid": np.ones(3, bool)}
            )
        ds = xr.open_zarr(path, consolidated=False)
        assert ds["logits"].dims == ("image", *dims) and "rank" not in ds.dims
        np.testing.assert_array_equal(ds["logits"].values, values)
