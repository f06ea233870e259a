"""Tiled runs on a real LocalCluster and Zarr stores, against plain PyTorch on the whole image."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
import zarr
from distributed import Client, LocalCluster

import dask_infer
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.tiles.store import TILE_MANIFEST
from dask_infer.workflows.summary import RunSummary
from dask_infer.workflows.tiled import plan_tiles
from tests.tiles.nets import TileClassifier, TinyFCN

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
_CRS = 'PROJCS["WGS 84 / UTM zone 33N"]'


def _georeferenced(path: Path, images: np.ndarray, chunk: int) -> Path:
    """A store like a satellite scene's: projected x/y coordinates and a spatial_ref variable."""
    n, height, width, _ = images.shape
    ys = 5_000_000.0 - 10.0 * np.arange(height) - 5.0
    xs = 400_000.0 + 10.0 * np.arange(width) + 5.0
    ds = xr.Dataset(
        {"images": (("image", "y", "x", "channel"), images, {"grid_mapping": "spatial_ref"})},
        coords={
            "y": ("y", ys, {"units": "m", "standard_name": "projection_y_coordinate"}),
            "x": ("x", xs, {"units": "m", "standard_name": "projection_x_coordinate"}),
            "spatial_ref": ((), 0, {"crs_wkt": _CRS, "GeoTransform": "400000 10 0 5000000 0 -10"}),
        },
    )
    ds.to_zarr(path, encoding={"images": {"chunks": (1, chunk, chunk, 3)}}, consolidated=False)
    return path


def _run(src: Path | str, out: Path | str, client: Client, **options: Any) -> RunSummary:
    """``dask_infer.run`` of ``src`` into ``out`` on ``client``, quietly unless ``echo`` is given."""
    return dask_infer.run(str(src), str(out), client=client, **{"progress": False, "echo": None, **options})


def _model_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - _MEAN) / _STD


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, size=(2, 96, 80, 3), dtype=np.uint8)
    return _georeferenced(tmp_path_factory.mktemp("scene") / "scene.zarr", images, 24), images


def test_dense_tiles_equal_whole_image_forward(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    out = tmp_path / "map.zarr"
    lines: list[str] = []
    _run(
        src,
        out,
        client,
        model=TinyFCN(),
        tile=32,
        halo="auto",
        outputs=("mask", "logits"),
        echo=lines.append,
    )
    assert any(line.startswith("halo auto: ") and "output stride 2" in line for line in lines), lines
    with torch.inference_mode():
        whole = TinyFCN().eval()(_model_input(images)).numpy()
    ds = xr.open_zarr(out)
    logits = ds["logits"].values
    assert ds["logits"].dims == ("image", "category", "y", "x")
    assert np.abs(logits - whole).max() <= 1e-5 * np.abs(whole).max()
    assert ds["mask"].dims == ("image", "y", "x") and ds["mask"].dtype == np.uint8
    np.testing.assert_array_equal(ds["mask"].values, whole.argmax(axis=1))
    source = xr.open_zarr(src, consolidated=False)
    np.testing.assert_array_equal(ds["y"].values, source["y"].values)
    np.testing.assert_array_equal(ds["x"].values, source["x"].values)
    assert ds["x"].attrs["standard_name"] == "projection_x_coordinate"
    assert ds["spatial_ref"].attrs["crs_wkt"] == _CRS
    assert ds["mask"].attrs["grid_mapping"] == "spatial_ref"
    assert ds.attrs["dask_infer_complete"] is True
    assert ds.attrs["tile"] == 32 and ds.attrs["halo"] > 0
    assert int(np.asarray(zarr.open_group(str(out), mode="r")[TILE_MANIFEST][:]).sum()) == 2 * 3 * 3


def test_dense_tiles_without_halo_show_seams(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    out = tmp_path / "seams.zarr"
    _run(
        src,
        out,
        client,
        model=TinyFCN(),
        tile=32,
        halo=0,
        outputs=("logits",),
    )
    with torch.inference_mode():
        whole = TinyFCN().eval()(_model_input(images)).numpy()
    assert np.abs(xr.open_zarr(out)["logits"].values - whole).max() > 1e-3 * np.abs(whole).max()


def test_tile_classification_map(scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path) -> None:
    src, images = scene
    out = tmp_path / "tiles.zarr"
    _run(
        src,
        out,
        client,
        model=TileClassifier(),
        tile=32,
        stride=16,
    )
    ds = xr.open_zarr(out)
    assert ds["logits"].dims == ("image", "tile_y", "tile_x", "category")
    assert ds["logits"].shape == (2, 5, 4, 5)
    x = _model_input(images)
    net = TileClassifier().eval()
    expected = np.zeros((2, 5, 4, 5), dtype=np.float32)
    with torch.inference_mode():
        for r in range(5):
            for c in range(4):
                expected[:, r, c] = net(x[:, :, 16 * r : 16 * r + 32, 16 * c : 16 * c + 32]).numpy()
    assert np.abs(ds["logits"].values - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(ds["probabilities"].values.sum(axis=-1), 1.0, rtol=1e-5)
    source = xr.open_zarr(src, consolidated=False)
    # Tile centres in the input's coordinates: pixel 15.5 lies between y[15] and y[16].
    np.testing.assert_allclose(ds["tile_y"].values[0], source["y"].values[15:17].mean())
    np.testing.assert_allclose(ds["tile_x"].values[-1], source["x"].values[63:65].mean())


def test_resume_computes_only_missing_tiles(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    out = tmp_path / "resume.zarr"
    options = {
        "model": "tests.tiles.nets:tiny_fcn",
        "tile": 32,
        "halo": 8,
        "client": client,
        "progress": False,
        "echo": None,
    }
    dask_infer.run(str(src), str(out), outputs=("mask",), **options)
    first = xr.open_zarr(out)["mask"].values
    group = zarr.open_group(str(out), mode="r+")
    group[TILE_MANIFEST][1, 2, 0] = 0  # type: ignore[index]
    group["mask"][1, 64:96, 0:32] = 255  # type: ignore[index]
    lines: list[str] = []
    dask_infer.run(str(src), str(out), outputs=("mask",), resume=True, **{**options, "echo": lines.append})
    assert any("17 tile task(s) already written" in line for line in lines), lines
    np.testing.assert_array_equal(xr.open_zarr(out)["mask"].values, first)


@pytest.mark.parametrize(
    ("compress", "stages"), [("bf16", 1), ("bf16", 2), ("0:bf16,1:fp32", 2), ("0:fp32,1:bf16", 2)]
)
def test_a_compression_recipe_runs_on_tiles(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path, compress: str, stages: int
) -> None:
    """Whole-model and per-stage recipes, the stages pipelined (the last one's map, bf16 or
    not, resized to the window as the model does)."""
    src, images = scene
    out = tmp_path / "bf16.zarr"
    _run(
        src,
        out,
        client,
        model=TinyFCN(),
        tile=32,
        halo=8,
        outputs=("logits",),
        compress=compress,
        stages=stages,
        placement="pipeline" if stages > 1 else "data",
    )
    with torch.inference_mode():
        whole = TinyFCN().eval()(_model_input(images)).numpy()
    # bf16 keeps 8 bits of mantissa: within a few percent of the largest logit.
    assert np.abs(xr.open_zarr(out)["logits"].values - whole).max() <= 0.05 * np.abs(whole).max()


def test_float16_logits_are_the_float32_runs_cast(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    runs = {}
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.zarr"
        _run(
            src,
            out,
            client,
            model=TinyFCN(),
            tile=32,
            halo=8,
            outputs=("mask", "logits"),
            logits_dtype=dtype,
        )
        runs[dtype] = xr.open_zarr(out)
        assert zarr.open_group(str(out), mode="r")["logits"].dtype == np.dtype(dtype)  # type: ignore[union-attr]
        assert runs[dtype].attrs["logits_dtype"] == dtype
    wide, half = runs["float32"]["logits"].values, runs["float16"]["logits"].values
    assert half.dtype == np.float16 and wide.dtype == np.float32
    # float16 keeps 11 significant bits: each value within half a unit in the last place.
    assert np.all(np.abs(half.astype(np.float32) - wide) <= 2.0**-11 * np.abs(wide) + 2.0**-25)
    np.testing.assert_array_equal(half, wide.astype(np.float16))
    # The mask is the float32 scores' argmax in both.
    np.testing.assert_array_equal(runs["float16"]["mask"].values, runs["float32"]["mask"].values)


def test_scale_factor_tiles_equal_the_whole_resampled_image_forward(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    out = tmp_path / "half.zarr"
    lines: list[str] = []
    _run(
        src,
        out,
        client,
        model=TinyFCN(),
        tile=16,
        halo="auto",
        scale_factor=0.5,
        outputs=("mask", "logits"),
        echo=lines.append,
    )
    assert any("images of 96x80 resampled (bilinear) to 48x40 before tiling" in line for line in lines), lines
    # The whole image resampled at once by torch (what the run defines), then one forward pass.
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(48, 40), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        whole = TinyFCN().eval()((x - _MEAN) / _STD).numpy()
    ds = xr.open_zarr(out)
    logits = ds["logits"].values
    assert logits.shape == (2, 4, 48, 40)
    assert np.abs(logits - whole).max() <= 1e-5 * np.abs(whole).max()
    agree = (ds["mask"].values == whole.argmax(axis=1)).mean()
    assert agree >= 0.999, agree
    # Coordinates: the input's at each resampled pixel's centre, between two input pixels here.
    source = xr.open_zarr(src, consolidated=False)
    np.testing.assert_allclose(ds["y"].values, source["y"].values.reshape(-1, 2).mean(axis=1))
    np.testing.assert_allclose(ds["x"].values, source["x"].values.reshape(-1, 2).mean(axis=1))
    assert ds["x"].attrs["standard_name"] == "projection_x_coordinate"
    assert ds["spatial_ref"].attrs["GeoTransform"] == "400000 20 0 5000000 0 -20"
    assert ds["spatial_ref"].attrs["crs_wkt"] == _CRS
    assert ds.attrs["scale_factor"] == 0.5
    # A resume must resample as the run did, and store logits the same way.
    for changed, name in (({"scale_factor": 1}, "resample"), ({"logits_dtype": "float16"}, "logits_dtype")):
        options = {"scale_factor": 0.5, "outputs": ("mask", "logits"), **changed}
        config = RunConfig(str(src), str(out), model=TinyFCN(), tile=16, halo="auto", resume=True, **options)
        with pytest.raises(DaskInferError, match=f"it was written with other {name}; resume with the same"):
            plan_tiles(config)


def test_scale_factor_tile_classification_with_float16_logits(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, images = scene
    out = tmp_path / "tiles.zarr"
    _run(
        src,
        out,
        client,
        model=TileClassifier(),
        tile=16,
        stride=8,
        scale_factor=0.5,
        logits_dtype="float16",
        interpolation="bicubic",
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (F.interpolate(x, size=(48, 40), mode="bicubic", antialias=True, align_corners=False) - _MEAN) / _STD
    net = TileClassifier().eval()
    expected = np.zeros((2, 5, 4, 5), dtype=np.float32)
    with torch.inference_mode():
        for r in range(5):
            for c in range(4):
                expected[:, r, c] = net(x[:, :, 8 * r : 8 * r + 16, 8 * c : 8 * c + 16]).numpy()
    ds = xr.open_zarr(out)
    logits = ds["logits"].values
    assert logits.dtype == np.float16 and logits.shape == (2, 5, 4, 5)
    error = np.abs(logits.astype(np.float32) - expected)
    assert np.all(error <= 2.0**-11 * np.abs(expected) + 1e-5 * np.abs(expected).max())
    assert ds["probabilities"].dtype == np.float32
    # Tile centres: resampled pixel 7.5 is input position 15.5, between y[15] and y[16].
    source = xr.open_zarr(src, consolidated=False)
    np.testing.assert_allclose(ds["tile_y"].values[0], source["y"].values[15:17].mean())


@pytest.mark.parametrize(
    ("placement", "stages", "replicas"), [("pipeline", 2, None), ("hybrid", 2, 1), ("data", 2, None)]
)
def test_dense_tiles_through_stages_equal_the_one_stage_run(
    scene: tuple[Path, np.ndarray],
    client: Client,
    tmp_path: Path,
    placement: str,
    stages: int,
    replicas: int | None,
) -> None:
    """TinyFCN ends by resizing its map to its input's size: it is cut without that resize,
    which the last stage applies to each tile's window; every tile's map is the same bits."""
    src, images = scene
    common = {"model": TinyFCN(), "tile": 32, "halo": "auto", "outputs": ("mask", "logits")}
    one = tmp_path / "one.zarr"
    _run(src, one, client, **common)
    out = tmp_path / "staged.zarr"
    lines: list[str] = []
    summary = _run(
        src,
        out,
        client,
        placement=placement,
        stages=stages,
        replicas=replicas,
        echo=lines.append,
        **common,
    )
    assert any("the last stage resizes its map to the window" in line for line in lines), lines
    assert summary.placement["mode"] == placement and summary.placement["num_stages"] == 2
    got, want = xr.open_zarr(out), xr.open_zarr(one)
    np.testing.assert_array_equal(got["logits"].values, want["logits"].values)
    np.testing.assert_array_equal(got["mask"].values, want["mask"].values)
    with torch.inference_mode():
        whole = TinyFCN().eval()(_model_input(images)).numpy()
    assert np.abs(got["logits"].values - whole).max() <= 1e-5 * np.abs(whole).max()
    assert got.attrs["dask_infer_complete"] is True


def test_tile_classification_through_a_pipeline_equals_the_one_stage_run(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path
) -> None:
    src, _ = scene
    common = {"model": TileClassifier(), "tile": 32, "stride": 16, "outputs": ("logits", "probabilities")}
    _run(src, tmp_path / "one.zarr", client, **common)
    summary = _run(
        src,
        tmp_path / "piped.zarr",
        client,
        placement="pipeline",
        stages=2,
        **common,
    )
    assert summary.placement["mode"] == "pipeline"
    assert [len(group) for group in summary.placement["groups"][0]] == [1, 1]
    got, want = xr.open_zarr(tmp_path / "piped.zarr"), xr.open_zarr(tmp_path / "one.zarr")
    assert got["logits"].dims == ("image", "tile_y", "tile_x", "category")
    np.testing.assert_array_equal(got["logits"].values, want["logits"].values)
    np.testing.assert_array_equal(got["probabilities"].values, want["probabilities"].values)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"scale_factor": 0.25},
            "scale_factor=0.25 leaves the images of .* 24x20 pixels, smaller than tile=32; give a scale "
            "factor of at least 0.4 or a smaller tile",
        ),
        ({"outputs": ("mask", "top_k")}, "tiled runs write mask, logits, probabilities; drop top_k"),
        ({"resize": 256}, "resize given with tile=32: tiles go to the model at their own size"),
        (
            {"placement": "pipeline", "stages": 9},
            r"stages=9 but TinyFCN has only 4 cut points; use stages <= 5",
        ),
        ({"stride": 16}, "stride=16 given, but TinyFCN returns maps"),
    ],
)
def test_what_tiles_cannot_honour_is_refused_before_any_cluster(
    scene: tuple[Path, np.ndarray], tmp_path: Path, options: dict, match: str
) -> None:
    config = RunConfig(str(scene[0]), str(tmp_path / "o.zarr"), model=TinyFCN(), tile=32, halo=4, **options)
    with pytest.raises(DaskInferError, match=match):
        plan_tiles(config)
    assert not (tmp_path / "o.zarr").exists()


def _tiles_written(path: Path) -> int:
    """Tiles the manifest of ``path`` records (0 while it does not exist or is being written)."""
    try:
        return int(np.asarray(zarr.open_group(str(path), mode="r")[TILE_MANIFEST][:]).sum())
    except Exception:  # not created yet, or a chunk caught mid-write: look again
        return 0


_PIPELINED_TILES = {
    "model": "tests.tiles.nets:tiny_fcn",
    "tile": 32,
    "halo": 8,
    "outputs": ("mask", "logits"),
    "placement": "pipeline",
    "stages": 2,
    "progress": False,
}


def _big_scene(tmp_path: Path) -> Path:
    images = np.random.default_rng(3).integers(0, 256, size=(6, 128, 128, 3), dtype=np.uint8)
    return _georeferenced(tmp_path / "big.zarr", images, 32)


def _kill_after_tiles(
    output: Path, tiles: int, kill: Callable[[], object]
) -> tuple[threading.Thread, threading.Event]:
    """A thread running ``kill`` once ``output``'s manifest records ``tiles`` tiles; the event says it ran."""
    killed = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _tiles_written(output) < tiles:
            time.sleep(0.01)
        kill()
        killed.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher, killed


def _same_maps(got: Path, want: Path) -> None:
    a, b = xr.open_zarr(got), xr.open_zarr(want)
    np.testing.assert_array_equal(a["logits"].values, b["logits"].values)
    np.testing.assert_array_equal(a["mask"].values, b["mask"].values)
    assert a.attrs["dask_infer_complete"] is True


def _two_workers() -> LocalCluster:
    return LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    )


def test_a_tile_pipeline_places_its_stages_again_when_a_stage_worker_is_restarted(tmp_path: Path) -> None:
    """SIGKILL one stage's worker mid-run: its nanny restarts it under a new address, the run
    places the stages again on the two workers and runs only the tiles not yet written; the
    output equals an undisturbed run's."""
    src = _big_scene(tmp_path)
    hit = tmp_path / "hit.zarr"
    lines: list[str] = []
    with _two_workers() as cluster, Client(cluster) as client:
        dask_infer.run(str(src), str(tmp_path / "calm.zarr"), client=client, echo=None, **_PIPELINED_TILES)
        pids = client.run(os.getpid)
        victim = sorted(pids)[-1]
        watcher, killed = _kill_after_tiles(hit, 8, lambda: os.kill(pids[victim], signal.SIGKILL))
        summary = dask_infer.run(str(src), str(hit), client=client, echo=lines.append, **_PIPELINED_TILES)
        watcher.join(timeout=5)
        assert killed.is_set()
    assert summary.placement["recoveries"] == 1
    assert victim not in str(summary.placement["groups"])
    lost = [line for line in lines if line.startswith(f"worker {victim} holding stage(s) ")]
    assert len(lost) == 1 and "placing the stages again on the 2 worker(s) there are" in lost[0], lines
    _same_maps(hit, tmp_path / "calm.zarr")


def test_a_tile_pipeline_left_without_enough_workers_stops_and_resume_finishes_it(tmp_path: Path) -> None:
    """Kill a stage worker and its nanny, so nothing brings it back: one worker cannot hold a
    2-stage pipeline, so the run stops in one line naming the worker; the tiles written stay
    and --resume, on a cluster of two again, writes the rest."""
    src = _big_scene(tmp_path)
    hit = tmp_path / "hit.zarr"
    with _two_workers() as cluster, Client(cluster) as client:
        dask_infer.run(str(src), str(tmp_path / "calm.zarr"), client=client, echo=None, **_PIPELINED_TILES)
        victim = sorted(client.run(os.getpid))[-1]
        pid = client.run(os.getpid, workers=[victim])[victim]
        nanny = next(n for n in cluster.workers.values() if n.worker_address == victim)

        def kill() -> None:
            nanny.close_gracefully(reason="test: the nanny is gone")
            os.kill(pid, signal.SIGKILL)

        watcher, killed = _kill_after_tiles(hit, 8, kill)
        lost = rf"worker {victim} holding stage\(s\) \d of the pipeline left the cluster.*--resume"
        with pytest.raises(DaskInferError, match=lost):
            dask_infer.run(str(src), str(hit), client=client, echo=None, **_PIPELINED_TILES)
        watcher.join(timeout=5)
        assert killed.is_set()
    written = _tiles_written(hit)
    assert 8 <= written < 6 * 16
    lines: list[str] = []
    with _two_workers() as cluster, Client(cluster) as client:
        dask_infer.run(str(src), str(hit), client=client, resume=True, echo=lines.append, **_PIPELINED_TILES)
    assert any(f"{written} tile task(s) already written" in line for line in lines), lines
    _same_maps(hit, tmp_path / "calm.zarr")


def test_stages_are_placed_for_the_images_a_tile_task_runs_at_once(
    scene: tuple[Path, np.ndarray], client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map's task runs one window and a classifier's its row's windows, not the CPU's batch of
    32: the stage memory check must not refuse a pipeline 32 windows would not fit."""
    from dask_infer.workflows import tiled

    batches: list[int] = []
    place = tiled.choose_placement

    def spy(*args: Any, **kwargs: Any) -> Any:
        batches.append(kwargs["batch_size"])
        return place(*args, **kwargs)

    monkeypatch.setattr(tiled, "choose_placement", spy)
    src, _ = scene
    piped = {"placement": "pipeline", "stages": 2}
    _run(src, tmp_path / "map.zarr", client, model=TinyFCN(), tile=32, halo=4, **piped)
    _run(src, tmp_path / "rows.zarr", client, model=TileClassifier(), tile=32, stride=16, **piped)
    assert batches == [1, 4]  # a row of 4 windows (80 pixels wide, tiles of 32 every 16)
