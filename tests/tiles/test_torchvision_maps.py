"""torchvision's segmentation models over tiles agree with their whole-image forward pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import xarray as xr
import zarr
from distributed import Client

import dask_infer

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _image(path: Path, side: int) -> np.ndarray:
    """A smooth random RGB image (16-pixel blocks plus noise) stored in 128-pixel chunks."""
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, size=(side // 16, side // 16, 3)).astype(np.float32)
    image = np.kron(coarse, np.ones((16, 16, 1), dtype=np.float32))
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)[None]
    arr = zarr.open_group(str(path), mode="w").create_array(
        "images",
        shape=image.shape,
        chunks=(1, 128, 128, 3),
        dtype="uint8",
        dimension_names=("image", "y", "x", "channel"),
    )
    arr[:] = image
    return image


def _whole(name: str, image: np.ndarray) -> np.ndarray:
    """Plain torchvision, seeded as a run builds it without weights, on the whole image."""
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21).eval()
    x = (torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255 - _MEAN) / _STD
    with torch.inference_mode():
        return net(x)["out"].numpy()


def _agreement(out: Path, whole: np.ndarray) -> float:
    return float((xr.open_zarr(out)["mask"].values == whole.argmax(axis=1)).mean())


@pytest.mark.parametrize("side", [512, pytest.param(1024, marks=pytest.mark.slow)])
def test_fcn_resnet50_tiles_with_auto_halo_agree_with_the_whole_image(
    side: int, client: Client, tmp_path: Path
) -> None:
    image = _image(tmp_path / "in.zarr", side)
    lines: list[str] = []
    dask_infer.run(
        str(tmp_path / "in.zarr"),
        str(tmp_path / "out.zarr"),
        model="fcn_resnet50",
        tile=256,
        halo="auto",
        client=client,
        progress=False,
        echo=lines.append,
    )
    assert any(line.startswith("halo auto: 128 px") for line in lines), lines
    assert _agreement(tmp_path / "out.zarr", _whole("fcn_resnet50", image)) >= 0.999


@pytest.mark.parametrize(
    "placement",
    [
        ["--workers", "1", "--threads", "2"],
        ["--workers", "2", "--threads", "1", "--stages", "2", "--placement", "pipeline"],
    ],
    ids=["data", "pipeline"],
)
def test_lraspp_from_a_weights_file_on_the_command_line(tmp_path: Path, placement: list[str]) -> None:
    """LR-ASPP's pooling branch sees only its tile: approximate, but close with the auto halo.
    Cut into a 2-stage pipeline (its final resize to the window kept out of the stages), too."""
    image = _image(tmp_path / "in.zarr", 256)
    torch.manual_seed(3)
    net = torchvision.models.get_model(
        "lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=21
    ).eval()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dask_infer.cli",
            "run",
            "--input",
            str(tmp_path / "in.zarr"),
            "--output",
            str(tmp_path / "out.zarr"),
            "--model",
            "lraspp_mobilenet_v3_large",
            "--weights",
            str(tmp_path / "w.pt"),
            "--tile",
            "128",
            "--halo",
            "auto",
            "--outputs",
            "mask,logits",
            *placement,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "halo auto: 64 px" in proc.stdout, proc.stdout
    if "pipeline" in placement:
        assert "placement: pipeline" in proc.stdout and "resizes its map to the window" in proc.stdout
    x = (torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255 - _MEAN) / _STD
    with torch.inference_mode():
        whole = net(x)["out"].numpy()
    ds = xr.open_zarr(tmp_path / "out.zarr")
    assert ds["logits"].shape == (1, 21, 256, 256)
    assert float((ds["mask"].values == whole.argmax(axis=1)).mean()) >= 0.95
