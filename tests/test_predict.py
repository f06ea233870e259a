"""dask_infer.predict: a lazy Dataset equal to a plain PyTorch forward, built without reading pixels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from distributed import Client

import dask_infer
from dask_infer.errors import DaskInferError, InputError
from dask_infer.workflows import lazy
from dask_infer.workflows.execution import runtime_stats
from dask_infer.workflows.runtime import compute_executor
from tests.conftest import random_images
from tests.reference import assert_close_logits, reference_logits


def _predict(images: Any, weights: Path, client: Client, **kw: Any) -> xr.Dataset:
    return dask_infer.predict(images, model="resnet18", weights=str(weights), client=client, **kw)


def _raising_blocks(shape: tuple[int, ...], chunk: int) -> da.Array:
    """A dask array every block of which raises when computed."""

    def boom(block: np.ndarray) -> np.ndarray:
        raise AssertionError("a pixel was read")

    return da.zeros(shape, dtype="uint8", chunks=(chunk, -1, -1, -1)).map_blocks(boom, dtype="uint8")


def test_datetime_coord_and_unaligned_chunks_match_pytorch(small_weights: Path, client: Client) -> None:
    images = random_images(30, seed=3)
    times = np.datetime64("2024-01-01T00:00:00", "s") + np.arange(30) * np.timedelta64(6, "h")
    array = xr.DataArray(
        da.from_array(images, chunks=(7, 32, 16, 3)),
        dims=("time", "y", "x", "band"),
        coords={"time": times, "label": ("time", np.arange(30) % 10)},
        name="pixels",
    )
    ds = _predict(array, small_weights, client, batch_size=4, outputs=("logits", "probabilities", "top_k"))
    assert ds.logits.dims == ("image", "category") and ds.top_k_class.dims == ("image", "rank")
    assert ds.logits.chunks[0] == (7, 7, 7, 7, 2)
    out = ds.compute()
    assert_close_logits(out.logits.values, reference_logits(images, "resnet18", str(small_weights)))
    assert out.image.dtype == array.time.dtype
    np.testing.assert_array_equal(out.image.values, array.time.values)
    np.testing.assert_array_equal(out.label.values, np.arange(30) % 10)
    assert out.valid.values.all()
    np.testing.assert_array_equal(out.top_k_class.values[:, 0], out.probabilities.values.argmax(axis=1))
    assert list(out.class_name.values) == [f"c{i}" for i in range(10)]
    runtime = ds.attrs[lazy.RUNTIME_ATTR]
    stats = runtime_stats(client, runtime)
    assert [s["loads"] for s in stats.values()] == [1] * len(client.scheduler_info()["workers"])
    assert sum(s["images"] for s in stats.values()) == 30
    threads = client.run(lambda dask_worker: len(dask_worker.executors[compute_executor(runtime)]._threads))
    assert sum(threads.values()) >= 1, "the model tasks did not run in the runtime's compute executor"
    groups = {str(k[0]).rsplit("-", 1)[0] for k in ds.logits.data.__dask_graph__()}
    assert {"read", "infer_resnet18"} <= groups


def test_building_reads_no_pixels_and_runs_no_model(small_weights: Path, client: Client) -> None:
    array = xr.DataArray(_raising_blocks((12, 32, 32, 3), 5), dims=("image", "y", "x", "channel"))
    ds = _predict(array, small_weights, client, outputs=("logits", "top_k"), top_k=3)
    assert isinstance(ds.logits.data, da.Array) and isinstance(ds.valid.data, da.Array)
    assert ds.top_k_class.shape == (12, 3)
    stats = runtime_stats(client, ds.attrs[lazy.RUNTIME_ATTR])
    assert all(s["images"] == 0 and s["chunks"] == 0 for s in stats.values())
    again = _predict(array, small_weights, client, outputs=("logits", "top_k"), top_k=3)
    assert again.attrs[lazy.RUNTIME_ATTR] == ds.attrs[lazy.RUNTIME_ATTR]
    assert all(s["loads"] == 1 for s in runtime_stats(client, ds.attrs[lazy.RUNTIME_ATTR]).values())
    with pytest.raises(Exception, match="a pixel was read"):
        ds.logits.compute()


def test_composes_and_writes_zarr(
    small_dataset: Path, small_weights: Path, client: Client, tmp_path: Path
) -> None:
    images = dask_infer.open_images(str(small_dataset), chunks=24)
    ds = _predict(images, small_weights, client, batch_size=5)
    want = reference_logits(images.values, "resnet18", str(small_weights))
    part = ds.isel(image=slice(30, 60)).logits.compute()
    assert_close_logits(part.values, want[30:60])
    joined = xr.concat([ds.isel(image=slice(0, 10)), ds.isel(image=slice(190, 200))], dim="image")
    assert_close_logits(joined.logits.values, np.concatenate([want[:10], want[190:]]))
    top = xr.apply_ufunc(
        np.argmax, ds.logits, input_core_dims=[["category"]], kwargs={"axis": -1}, dask="parallelized"
    )
    np.testing.assert_array_equal(top.values, want.argmax(axis=1))
    ds.to_zarr(tmp_path / "preds.zarr")
    back = dask_infer.open_results(str(tmp_path / "preds.zarr"))
    assert_close_logits(back.logits.values, want)
    np.testing.assert_array_equal(back.label.values, np.arange(200) % 10)


def test_numpy_nchw_and_features(small_weights: Path, client: Client) -> None:
    images = random_images(6, seed=5)
    ds = _predict(
        np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
        small_weights,
        client,
        layout="NCHW",
        outputs=("logits", "features"),
        feature_layer="avgpool",
    )
    assert ds.features.dims == ("image", "feature") and ds.features.shape == (6, 512)
    assert_close_logits(ds.logits.values, reference_logits(images, "resnet18", str(small_weights)))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"stages": 2}, "data-parallel"),
        ({"placement": "pipeline"}, "data-parallel"),
        ({"output": "x.zarr"}, "apply to dask_infer.run"),
        ({"bogus": 1}, "unknown option"),
    ],
)
def test_refuses_run_only_options(
    options: dict[str, Any], match: str, small_weights: Path, client: Client
) -> None:
    with pytest.raises(DaskInferError, match=match):
        _predict(np.zeros((2, 32, 32, 3), np.uint8), small_weights, client, **options)


def test_refuses_bad_input_and_no_client(small_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="int32"):
        dask_infer.predict(np.zeros((2, 32, 32, 3), np.int32), model="resnet18", weights=str(small_weights))
    with pytest.raises(InputError, match="xarray.DataArray"):
        dask_infer.predict([1, 2], model="resnet18")

    def no_client() -> Client:
        raise ValueError("No global client found")

    monkeypatch.setattr(lazy, "get_client", no_client)
    with pytest.raises(DaskInferError, match=r"distributed\.Client\(\)"):
        dask_infer.predict(np.zeros((2, 32, 32, 3), np.uint8), model="resnet18", weights=str(small_weights))


def test_run_takes_an_open_images_array(
    small_dataset: Path, small_weights: Path, client: Client, tmp_path: Path
) -> None:
    images = dask_infer.open_images(str(small_dataset))
    kw: dict[str, Any] = {"model": "resnet18", "weights": str(small_weights), "client": client}
    dask_infer.run(images, str(tmp_path / "out.zarr"), progress=False, echo=None, **kw)
    got = dask_infer.open_results(str(tmp_path / "out.zarr")).logits.values
    assert_close_logits(got, reference_logits(images.values, "resnet18", str(small_weights)))


def test_run_takes_any_data_array(
    small_dataset: Path, small_weights: Path, client: Client, tmp_path: Path
) -> None:
    """A selection, or an array opened with xarray.open_zarr, runs as predict does and is written
    as a run's output: the same logits as PyTorch, complete, with its summary, read by open_results."""
    kw: dict[str, Any] = {"model": "resnet18", "weights": str(small_weights), "client": client, "echo": None}
    images = xr.open_zarr(small_dataset)["images"]
    want = reference_logits(images.values, "resnet18", str(small_weights))
    out = tmp_path / "open-zarr.zarr"
    summary = dask_infer.run(images, str(out), progress=False, chunk_size=48, **kw)
    assert summary.images == 200 and summary.chunks == 5 and summary.chunk_size == 48
    results = dask_infer.open_results(str(out))
    assert_close_logits(results.logits.values, want)
    assert results.attrs["dask_infer_complete"] is True
    assert results.attrs["run_summary"]["images"] == 200
    np.testing.assert_array_equal(results["label"].values, images["label"].values)

    part = dask_infer.open_images(str(small_dataset)).isel(image=slice(10, 30))
    dask_infer.run(part, str(tmp_path / "part.zarr"), progress=False, **kw)
    got = dask_infer.open_results(str(tmp_path / "part.zarr"))
    assert_close_logits(got.logits.values, want[10:30])
    np.testing.assert_array_equal(got["image"].values, np.arange(10, 30))

    # The output is a run's: refused without overwrite, replaced with it.
    with pytest.raises(DaskInferError, match=r"exists; pass --overwrite"):
        dask_infer.run(part, str(out), progress=False, **kw)
    dask_infer.run(part, str(out), progress=False, overwrite=True, **kw)
    assert dask_infer.open_results(str(out)).sizes["image"] == 20


def test_a_data_array_refuses_what_needs_a_store(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    part = dask_infer.open_images(str(small_dataset)).isel(image=slice(0, 10))
    with pytest.raises(DaskInferError, match=r"\['report', 'resume'\] need a Zarr store"):
        dask_infer.run(
            part,
            str(tmp_path / "o.zarr"),
            model="resnet18",
            resume=True,
            report=str(tmp_path / "r.html"),
            echo=None,
        )
    assert not (tmp_path / "o.zarr").exists()


def test_the_model_is_unloaded_once_no_result_can_run_it(small_weights: Path, client: Client) -> None:
    import gc
    import time

    images = random_images(12)
    ds = _predict(images, small_weights, client, batch_size=4)
    name = ds.attrs[lazy.RUNTIME_ATTR]
    again = _predict(images, small_weights, client, batch_size=4)  # the same spec shares the runtime
    assert again.attrs[lazy.RUNTIME_ATTR] == name
    part = ds.isel(image=slice(0, 4))

    def loaded() -> bool:
        return all(
            name in plugins for plugins in client.run(lambda dask_worker: list(dask_worker.plugins)).values()
        )

    assert loaded()
    del ds, again
    gc.collect()
    time.sleep(1.0)
    assert loaded(), "a selection of the result can still run the model"
    assert_close_logits(part.logits.values, reference_logits(images[:4], "resnet18", str(small_weights)))
    del part
    gc.collect()
    deadline = time.monotonic() + 20
    while (loaded() or lazy._registered(client, name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not lazy._registered(client, name)
    assert not any(name in p for p in client.run(lambda dask_worker: list(dask_worker.plugins)).values())
