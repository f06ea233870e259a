"""A 6-band uint16 store with a time dim, run with a 6-channel model and with 3 picked bands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from distributed import Client

import dask_infer
from dask_infer.errors import DaskInferError, InputError
from dask_infer.io.images import describe_source, open_images, read_chunk
from dask_infer.models.registry import build_model
from tests.reference import assert_close_logits

BANDS, SIZE, N = 6, 32, 24
SCALE = 10000.0


@pytest.fixture(scope="module")
def multispectral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images of 6 uint16 bands (reflectance x 10000) as (time, band, y, x), time in datetime64."""
    path = tmp_path_factory.mktemp("ms") / "ms.zarr"
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 10001, (N, BANDS, SIZE, SIZE), dtype=np.uint16)
    times = np.datetime64("2024-01-01T00:00", "ns") + np.arange(N) * np.timedelta64(5, "D")
    ds = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), pixels)},
        coords={"time": times, "band": np.arange(1, BANDS + 1)},
    )
    ds.to_zarr(path, encoding={"reflectance": {"chunks": (8, BANDS, SIZE, SIZE)}}, zarr_format=3)
    return path


def _weights(path: Path, in_channels: int) -> Path:
    """A random ResNet-18 with 10 classes whose first convolution takes ``in_channels``."""
    module = build_model("resnet18", num_classes=10, seed=4).module
    conv = module.conv1
    torch.manual_seed(5)
    module.conv1 = torch.nn.Conv2d(in_channels, conv.out_channels, 7, stride=2, padding=3, bias=False)
    torch.save({"state_dict": module.state_dict(), "meta": {"input_size": SIZE}}, path)
    return path


@pytest.fixture(scope="module")
def six_band_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _weights(tmp_path_factory.mktemp("w6") / "resnet18-6band.pt", BANDS)


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _weights(tmp_path_factory.mktemp("w3") / "resnet18-rgb.pt", 3)


def _stored(path: Path) -> np.ndarray:
    """The pixels as (time, band, y, x), read with xarray, independently of dask-infer."""
    return xr.open_zarr(path)["reflectance"].values


def _plain_forward(weights: Path, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    state = torch.load(weights, weights_only=True)["state_dict"]
    module = build_model("resnet18", num_classes=10).module
    module.conv1 = torch.nn.Conv2d(x.shape[1], 64, 7, stride=2, padding=3, bias=False)
    module.load_state_dict(state)
    module.eval()
    with torch.inference_mode():
        return module((x - mean) / std).numpy()


def test_dims_map_pangeo_roles_without_renaming(multispectral: Path) -> None:
    source = describe_source(str(multispectral), dims={"image": "time", "channel": "band"})
    assert (source.layout, source.channels, source.dtype) == ("NCHW", BANDS, "uint16")
    images = read_chunk(source, 0, 3, pooled=False)
    np.testing.assert_array_equal(images, _stored(multispectral)[:3].transpose(0, 2, 3, 1))
    assert open_images(str(multispectral), dims={"channel": "band"}).sizes == {
        "image": N,
        "y": SIZE,
        "x": SIZE,
        "channel": BANDS,
    }
    with pytest.raises(InputError, match="has no dim 'bands'; its dims are time, band, y, x"):
        describe_source(str(multispectral), dims={"image": "time", "channel": "bands"})
    with pytest.raises(InputError, match="the image dim must come first"):
        describe_source(str(multispectral), dims={"image": "band", "channel": "time"})


def test_six_band_model_end_to_end(
    client: Client, multispectral: Path, six_band_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "six.zarr"
    summary = dask_infer.run(
        str(multispectral),
        str(out),
        model="resnet18",
        weights=str(six_band_weights),
        dims={"image": "time", "channel": "band"},
        scale=SCALE,
        chunk_size=8,
        client=client,
        progress=False,
        echo=None,
    )
    assert summary.images == N
    ds = xr.open_zarr(out)
    x = torch.from_numpy(_stored(multispectral).astype(np.float32)) / SCALE
    zeros, ones = torch.zeros(1, BANDS, 1, 1), torch.ones(1, BANDS, 1, 1)
    assert_close_logits(ds["logits"].values, _plain_forward(six_band_weights, x, zeros, ones))
    recorded = ds.attrs["preprocess"]
    recorded = json.loads(recorded) if isinstance(recorded, str) else recorded
    assert recorded["channels"] == BANDS and recorded["scale"] == SCALE and recorded["bands"] is None
    times = xr.open_zarr(multispectral)["time"].values
    assert ds["image"].dtype == times.dtype
    np.testing.assert_array_equal(ds["image"].values, times)


def test_three_picked_bands_for_an_rgb_model_through_the_cli(
    multispectral: Path, rgb_weights: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "rgb.zarr"
    mean, std = (0.1, 0.2, 0.3), (0.05, 0.1, 0.2)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dask_infer.cli",
            "run",
            "--input",
            str(multispectral),
            "--output",
            str(out),
            "--model",
            "resnet18",
            "--weights",
            str(rgb_weights),
            "--dims",
            "image=time,channel=band",
            "--bands",
            "4,3,2",
            "--scale",
            "10000",
            "--mean",
            ",".join(map(str, mean)),
            "--std",
            ",".join(map(str, std)),
            "--workers",
            "2",
            "--threads",
            "1",
            "--chunk-size",
            "8",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    x = torch.from_numpy(_stored(multispectral)[:, [3, 2, 1]].astype(np.float32)) / SCALE
    want = _plain_forward(
        rgb_weights, x, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    )
    assert_close_logits(xr.open_zarr(out)["logits"].values, want)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"bands": "7,3,2"}, InputError, "has 6 band(s), numbered 1 to 6 (bands are 1-based); band 7"),
        ({}, InputError, "has 6 channel(s) but model resnet18's first layer takes 3; pick 3 with --bands"),
        ({"bands": "4,3,2", "mean": "0.1,0.2"}, DaskInferError, "mean=0.1,0.2 has 2 values but the model"),
    ],
)
def test_bad_bands_refused_before_any_cluster(
    multispectral: Path,
    rgb_weights: Path,
    tmp_path: Path,
    options: dict[str, str],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        dask_infer.run(
            str(multispectral),
            str(tmp_path / "o.zarr"),
            model="resnet18",
            weights=str(rgb_weights),
            dims={"image": "time", "channel": "band"},
            echo=None,
            **options,  # type: ignore[arg-type]
        )
    assert not (tmp_path / "o.zarr").exists()
