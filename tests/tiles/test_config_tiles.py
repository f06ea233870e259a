"""RunConfig's tile options: canonical values, and one line for each misuse."""

from __future__ import annotations

import pytest

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError


def test_tile_options_round_trip_and_default_outputs_are_kept_for_the_model() -> None:
    config = RunConfig("in.zarr", "out.zarr", tile=256, halo="32", stride=None)
    assert (config.tile, config.halo, config.outputs) == (256, 32, ("logits", "top_k"))
    assert RunConfig.from_dict(config.to_dict()) == config
    assert (config.logits_dtype, config.scale_factor) == ("float32", 1.0)
    half = RunConfig("in.zarr", "out.zarr", tile=256, logits_dtype="float16", scale_factor=1)
    assert isinstance(half.scale_factor, float) and RunConfig.from_dict(half.to_dict()) == half
    assert RunConfig("in.zarr", "out.zarr", tile=256, halo="auto", outputs=["mask", "logits"]).outputs == (
        "mask",
        "logits",
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"outputs": ("mask",)}, "outputs include 'mask', which tiled runs write; give --tile"),
        ({"tile": 64, "halo": 65}, "halo=65 is larger than tile=64"),
        (
            {"tile": 64, "stride": 65},
            "stride=65 is larger than tile=64, so tiles would leave gaps of 1 pixels",
        ),
        ({"stride": 8}, "stride=8 given without tile"),
        ({"tile": 64, "halo": -1}, "halo=-1 must be a whole number of pixels >= 0 or 'auto'"),
        ({"tile": 64, "logits_dtype": "float64"}, "logits_dtype='float64' is not one of float32, float16"),
        ({"logits_dtype": "float16"}, "logits_dtype='float16' given without tile: only tiled runs store"),
        ({"tile": 64, "scale_factor": 0}, r"scale_factor=0 must be a number > 0 \(e.g. 0.5 halves"),
        ({"tile": 64, "scale_factor": -0.5}, r"scale_factor=-0.5 must be a number > 0"),
        ({"tile": 64, "scale_factor": float("nan")}, r"scale_factor=nan must be a number > 0"),
        ({"tile": 64, "scale_factor": "half"}, r"scale_factor='half' must be a number > 0"),
        ({"scale_factor": 0.5}, "scale_factor=0.5 given without tile: it resamples images before tiling"),
    ],
)
def test_bad_tile_config(options: dict, match: str) -> None:
    with pytest.raises(DaskInferError, match=match):
        RunConfig("in.zarr", "out.zarr", **options)
