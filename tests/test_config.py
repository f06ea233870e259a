"""RunConfig validation and round trips; chunk planning."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_infer import DaskInferError, RunConfig
from dask_infer.workflows.graph import plan_chunks


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


def test_chunks_are_whole_storage_chunks_and_cover_every_image() -> None:
    plan = plan_chunks(1000, 32, target=64, min_tasks=2)
    assert plan.size == 64 and plan.bounds[0] == (0, 64) and plan.bounds[-1] == (960, 1000)
    assert [s for s, _ in plan.bounds] == list(range(0, 1000, 64))
    small = plan_chunks(100, 16, target=64, min_tasks=4)
    assert small.size == 32 and len(small.bounds) == 4
    huge = plan_chunks(10_000, 5000, target=64)
    assert huge.size == 64


def test_chunk_target_follows_model_cost_and_image_size() -> None:
    from dask_infer.workflows.graph import chunk_target

    rgb224 = 224 * 224 * 3
    assert chunk_target(8.2e9, rgb224, gpu=True) == 304  # ResNet-50 on a GPU: ~50 ms a task
    assert chunk_target(8.2e9, rgb224, gpu=False) == 16  # floor: batches stay efficient
    assert chunk_target(1e6, rgb224, gpu=False) == (256 << 20) // rgb224  # capped by memory
    assert chunk_target(1e6, 32 * 32, gpu=False) == 4096
