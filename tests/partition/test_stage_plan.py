"""StagePlan: JSON round trip, validation, imbalance and the rendered table."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dask_infer.errors import DaskInferError
from dask_infer.partition import StageInfo, StagePlan, format_plan
from dask_infer.partition.stage_plan import PlanError


def make_plan(balance: str = "time") -> StagePlan:
    stages = tuple(
        StageInfo(
            index=i,
            first_node=f"layer{i}_conv",
            last_node=f"layer{i}_relu",
            num_nodes=10 + i,
            params=1000 * (i + 1),
            flops=2_000_000 * (i + 1),
            time_s=0.010 + 0.005 * i,
            weight_bytes=4000 * (i + 1),
            activation_bytes=1 << (20 + i),
        )
        for i in range(3)
    )
    return StagePlan(
        model="resnet50",
        balance=balance,
        input_shape=(1, 3, 224, 224),
        cut_points=("layer0_relu", "layer1_relu"),
        stages=stages,
        cut_shapes=((1, 256, 56, 56), (1, 512, 28, 28)),
        cut_bytes=(3211264, 1605632),
        output_shape=(1, 1000),
        num_candidates=38,
    )


def test_round_trips_through_dict_and_json() -> None:
    plan = make_plan()
    assert StagePlan.from_dict(plan.to_dict()) == plan
    assert StagePlan.from_json(plan.to_json()) == plan
    assert StagePlan.from_json(plan.to_json(indent=None)) == plan
    data = json.loads(plan.to_json())
    assert data["cut_points"] == ["layer0_relu", "layer1_relu"] and data["version"] == 1


def test_is_frozen() -> None:
    plan = make_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.balance = "flops"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("balance", "expected"),
    [("time", 0.020 / 0.015), ("flops", 6 / 4), ("params", 3000 / 2000)],
)
def test_imbalance_is_max_over_mean_of_the_balanced_cost(balance: str, expected: float) -> None:
    assert make_plan(balance).imbalance == pytest.approx(expected)


def test_memory_cost_is_weights_plus_activations() -> None:
    plan = make_plan("memory")
    assert plan.stage_costs[1] == 8000 + (1 << 21)


def test_format_plan_shows_stages_cuts_and_imbalance() -> None:
    text = format_plan(make_plan())
    lines = text.splitlines()
    assert lines[0].startswith("resnet50 in 3 stages, balanced by time (input 1x3x224x224, 38 cut points")
    assert "layer1_conv .. layer1_relu" in text
    assert "1x256x56x56" in text and "3.06 MiB" in text and "1x1000" in text
    assert "imbalance (max/mean time): 1.333" in text
    assert lines[-1] == "cut points: layer0_relu, layer1_relu"
    assert len(lines) == 1 + 1 + 3 + 2


def test_rejects_unknown_balance() -> None:
    with pytest.raises(PlanError, match="balance='speed' is not one of time, flops"):
        dataclasses.replace(make_plan(), balance="speed")


def test_rejects_inconsistent_cut_count() -> None:
    with pytest.raises(PlanError, match="3 stages but 1 cut points"):
        dataclasses.replace(make_plan(), cut_points=("layer0_relu",))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("cut_points"), r"missing keys \['cut_points'\]"),
        (lambda d: d.update(colour="red"), r"unknown keys \['colour'\]"),
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d["stages"][0].pop("flops"), r"stage has missing keys \['flops'\]"),
        (lambda d: d.update(cut_bytes=["many", "more"]), "malformed value"),
        (lambda d: d.update(stages="none"), "stage must be a JSON object"),
    ],
)
def test_from_dict_rejects_malformed_plans(edit, match: str) -> None:  # type: ignore[no-untyped-def]
    data = make_plan().to_dict()
    edit(data)
    with pytest.raises(DaskInferError, match=match):
        StagePlan.from_dict(data)


def test_from_json_rejects_text_that_is_not_json() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        StagePlan.from_json("{stages: 3")
    with pytest.raises(PlanError, match="must be a dict, not list"):
        StagePlan.from_json("[]")
