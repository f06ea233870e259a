"""A user's transform and the preprocessing knobs, on a real LocalCluster, against a plain forward."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from torchvision.transforms import v2

import dask_infer
from dask_infer.errors import DaskInferError
from dask_infer.models.registry import build_model
from tests.reference import assert_close_logits, run_small

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _pipeline() -> v2.Compose:
    """Resize up, crop back to the model's 32x32, scale and normalise: what the user ships."""
    return v2.Compose(
        [
            v2.Resize(40, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


class CountingTransform:
    """The pipeline above, recording each process that unpickles it in ``log``."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.pipeline = _pipeline()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pipeline(x)


def _plain(images: np.ndarray, weights: Path, transform: Any) -> np.ndarray:
    module = build_model("resnet18", weights=str(weights)).module
    x = transform(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    with torch.inference_mode():
        return module(x).numpy()


def test_transform_runs_on_workers_once_per_worker(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    log = tmp_path / "unpickled.txt"
    out = tmp_path / "t.zarr"
    summary = run_small(client, small_dataset, out, small_weights, transform=CountingTransform(str(log)))
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(xr.open_zarr(out)["logits"].values, _plain(images, small_weights, _pipeline()))
    assert summary.chunks > 2
    workers = set(client.run(os.getpid).values())
    unpickled = [int(line) for line in log.read_text().split()]
    on_workers = [pid for pid in unpickled if pid in workers]
    assert sorted(on_workers) == sorted(workers), unpickled
    recorded = xr.open_zarr(out).attrs["preprocess"]
    assert "CountingTransform" in str(recorded)


def test_knobs_match_torchvision(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """--resize 40 --crop 32 --interpolation bicubic --mean/--std equal the same v2 pipeline."""
    out = tmp_path / "k.zarr"
    run_small(
        client,
        small_dataset,
        out,
        small_weights,
        resize=40,
        crop=32,
        interpolation="bicubic",
        mean=MEAN,
        std=",".join(map(str, STD)),
    )
    pipeline = v2.Compose(
        [
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(40, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.Normalize(MEAN, STD),
        ]
    )
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(xr.open_zarr(out)["logits"].values, _plain(images, small_weights, pipeline))


def test_no_normalize_gives_pixels_in_zero_one(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "n.zarr"
    run_small(client, small_dataset, out, small_weights, normalize=False)
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    want = _plain(images, small_weights, v2.ToDtype(torch.float32, scale=True))
    assert_close_logits(xr.open_zarr(out)["logits"].values, want)


def _fails(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        (
            v2.Normalize(MEAN, STD),
            r"transform Normalize\(mean=\[0.5, 0.4, 0.3\].*\) failed on the input's first 2 image\(s\), "
            r"a batch \(N, C, H, W\) of shape \(2, 3, 32, 32\) and dtype uint8: TypeError: ",
        ),
        (_fails, r"transform tests.workflows.test_transforms._fails failed .* RuntimeError: boom; make it"),
        (v2.CenterCrop(16), r"returned a uint8 tensor of shape \(2, 3, 16, 16\) for a batch of shape"),
        (lambda x: x.float().flatten(1), r"returned a float32 tensor of shape \(2, 3072\)"),
    ],
)
def test_a_failing_transform_is_one_line_before_any_cluster(
    small_dataset: Path, small_weights: Path, tmp_path: Path, transform: Any, match: str
) -> None:
    with pytest.raises(DaskInferError, match=match) as info:
        dask_infer.run(
            str(small_dataset),
            str(tmp_path / "o.zarr"),
            model="resnet18",
            weights=str(small_weights),
            transform=transform,
            echo=None,
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"transform": _pipeline(), "mean": "0.5"}, "transform given with mean: the transform replaces"),
        ({"transform": "resize"}, "transform='resize' is not callable"),
        ({"resize": 16}, "resize=16 is smaller than the crop of 32"),
        ({"interpolation": "lanczos"}, "interpolation='lanczos' is not one of bilinear, bicubic, nearest"),
        ({"std": "0.2,0,0.3"}, "std='0.2,0,0.3': '0' is not a finite positive number"),
        ({"bands": "0,1"}, "bands are numbered from 1"),
        ({"dims": "image:time"}, "'image:time' is not role=dim"),
        ({"dims": {"time": "image"}}, "'time' is not a role; roles are image, y, x, channel"),
        ({"scale": 0}, "scale=0 must be a positive number"),
    ],
)
def test_bad_preprocessing_options(
    small_dataset: Path, small_weights: Path, tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(DaskInferError, match=match.replace("(", r"\(").replace(")", r"\)")):
        dask_infer.run(
            str(small_dataset),
            str(tmp_path / "o.zarr"),
            model="resnet18",
            weights=str(small_weights),
            echo=None,
            **options,
        )


def test_options_round_trip_through_yaml(tmp_path: Path) -> None:
    config = dask_infer.RunConfig(
        "in.zarr", "out.zarr", dims="image=time, channel=band", bands="3,2,1", mean=[0.1], scale=10000
    )
    assert config.dims == {"image": "time", "channel": "band"} and config.bands == (3, 2, 1)
    assert config.mean == (0.1,) and config.scale == 10000.0
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    assert dask_infer.RunConfig.from_yaml(tmp_path / "run.yaml") == config
    with_transform = config.replace(transform=_pipeline(), mean=None, scale=None)
    assert with_transform.to_dict()["transform"].startswith("Compose(")
