"""RunConfig validation and round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_infer import DaskInferError, RunConfig


def test_round_trips(tmp_path: Path) -> None:
    cfg = RunConfig(input="a.zarr", output="b.zarr", model="resnet18", outputs=("top_k", "logits"), top_k=3)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert RunConfig.from_yaml(path) == cfg
    assert RunConfig.from_yaml(path, model="resnet50").model == "resnet50"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"top_k": 0}, "top_k=0"),
        ({"chunk_size": -4}, "chunk_size=-4"),
        ({"outputs": ("logits", "embeddings")}, "outputs="),
        ({"device": "tpu"}, "device='tpu'"),
        ({"balance": "speed"}, "balance='speed'"),
        ({"input": ""}, "input=''"),
    ],
)
def test_validation_names_the_value(changes: dict, match: str) -> None:
    with pytest.raises(DaskInferError, match=match):
        RunConfig(**{"input": "a.zarr", "output": "b.zarr", **changes})


def test_unknown_yaml_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("input: a\noutput: b\nmodle: resnet18\n")
    with pytest.raises(DaskInferError, match="unknown config keys \\['modle'\\]"):
        RunConfig.from_yaml(path)
