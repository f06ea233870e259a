"""RunConfig's tile options: canonical values, and one line for each misuse."""

from __future__ import annotations

import pytest

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError


def test_tile_options_round_trip_and_default_outputs_are_kept_for_the_model() -> None:
    config = RunConfig("in.zarr", "out.zarr", tile=256, halo="32", stride=None)
    assert (config.tile, config.halo, config.outputs) == (256, 32, ("logits", "top_k"))
    assert RunConfig.from_dict(config.to_dict()) == config
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
    ],
)
def test_bad_tile_config(options: dict, match: str) -> None:
    with pytest.raises(DaskInferError, match=match):
        RunConfig("in.zarr", "out.zarr", **options)
