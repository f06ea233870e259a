"""Placement decisions from literal stage plans and worker records (no cluster)."""

from __future__ import annotations

import pytest

from dask_infer.partition.stage_plan import StageInfo, StagePlan
from dask_infer.workflows.placement import (
    PlacementError,
    WorkerInfo,
    choose_placement,
    stage_memory,
    workers_from_scheduler,
)

MiB = 2**20


def _plan(times: list[float], weights: list[int], activations: list[int], batch: int = 1) -> StagePlan:
    stages = tuple(
        StageInfo(k, f"a{k}", f"b{k}", 3, 10, 100, t, w, a)
        for k, (t, w, a) in enumerate(zip(times, weights, activations, strict=True))
    )
    n = len(stages)
    return StagePlan(
        model="m",
        balance="time",
        input_shape=(batch, 3, 8, 8),
        cut_points=tuple(f"c{k}" for k in range(n - 1)),
        stages=stages,
        cut_shapes=tuple((1, 4) for _ in range(n - 1)),
        cut_bytes=tuple(16 for _ in range(n - 1)),
        output_shape=(1, 10),
        num_candidates=n + 2,
    )


def _workers(n: int, memory: int = 1000 * MiB, device: bool = False) -> list[WorkerInfo]:
    return [WorkerInfo(f"tcp://w{i}", memory, "memory_limit", device) for i in range(n)]


def test_pipeline_puts_each_stage_on_its_own_workers() -> None:
    plan = _plan([1.0, 1.0, 1.0], [MiB] * 3, [MiB] * 3)
    p = choose_placement("pipeline", plan, _workers(3))
    assert p.mode == "pipeline" and p.replicas == 1
    assert [p.stage_workers(k) for k in range(3)] == [("tcp://w0",), ("tcp://w1",), ("tcp://w2",)]
    assert p.stages_on() == {"tcp://w0": (0,), "tcp://w1": (1,), "tcp://w2": (2,)}


def test_extra_workers_go_to_the_slowest_stage() -> None:
    plan = _plan([3.0, 1.0], [MiB] * 2, [MiB] * 2)
    p = choose_placement("pipeline", plan, _workers(4))
    assert [len(p.stage_workers(k)) for k in range(2)] == [3, 1]
    assert [len(g) for g in p.regrouped([1.0, 1.0]).groups[0]] == [2, 2]


def test_hybrid_makes_replicas_of_the_pipeline() -> None:
    plan = _plan([1.0, 1.0], [MiB] * 2, [MiB] * 2)
    p = choose_placement("hybrid", plan, _workers(5))
    assert p.replicas == 2 and p.num_stages == 2
    assert p.groups == ((("tcp://w0",), ("tcp://w1",)), (("tcp://w2",), ("tcp://w3",)))
    assert p.stage_workers(1, replica=1) == ("tcp://w3",)
    with pytest.raises(PlacementError, match=r"hybrid needs 6 workers \(3 replicas x 2 stages\).* has 5"):
        choose_placement("hybrid", plan, _workers(5), replicas=3)


def test_too_few_workers_names_the_numbers() -> None:
    plan = _plan([1.0] * 3, [MiB] * 3, [MiB] * 3)
    with pytest.raises(
        PlacementError,
        match=r"pipeline needs 3 workers \(1 per stage\) but the cluster has 2; "
        r"use --stages 2 or add workers",
    ):
        choose_placement("pipeline", plan, _workers(2))


def test_only_gpu_labelled_workers_run_stages() -> None:
    info = {
        "tcp://a": {"memory_limit": 10 * MiB, "resources": {"GPU": 1}},
        "tcp://b": {"memory_limit": 10 * MiB, "resources": {}},
        "tcp://c": {"memory_limit": 10 * MiB, "resources": {"GPU": 1}},
    }
    workers = workers_from_scheduler(info, {"tcp://c": 80 * 2**30})
    assert workers[2] == WorkerInfo("tcp://c", 80 * 2**30, "GPU memory", True)
    p = choose_placement("data", _plan([1.0, 1.0], [MiB] * 2, [MiB] * 2), workers)
    assert p.workers == ("tcp://a", "tcp://c")
    with pytest.raises(PlacementError, match="pipeline needs 3 GPU-labelled workers .* has 2"):
        choose_placement("pipeline", _plan([1.0] * 3, [MiB] * 3, [MiB] * 3), workers)


def test_memory_check_scales_activations_by_batch() -> None:
    plan = _plan([1.0, 1.0], [100 * MiB, 100 * MiB], [10 * MiB, 10 * MiB], batch=2)
    assert stage_memory(plan, 8) == (140 * MiB, 140 * MiB)
    workers = _workers(2, memory=200 * MiB)
    with pytest.raises(PlacementError, match=r"needs 280\.00 MiB .* has 200\.00 MiB \(memory_limit\)"):
        choose_placement("data", plan, workers, batch_size=8)
    assert choose_placement("pipeline", plan, workers, batch_size=8).mode == "pipeline"
    with pytest.raises(PlacementError, match=r"stage\(s\) \[0\] .* needs 380\.00 MiB"):
        choose_placement("pipeline", plan, workers, batch_size=56)


def test_auto_runs_data_parallel_when_the_model_fits() -> None:
    plan = _plan([1.0, 1.0], [MiB] * 2, [MiB] * 2)
    p = choose_placement("auto", plan, _workers(2), model="resnet50")
    assert p.mode == "data"
    assert "resnet50 needs 4.00 MiB" in p.reason and "all 2 stages" in p.reason
    assert choose_placement("auto", None, _workers(2)).mode == "data"


def test_auto_pipelines_a_model_too_big_for_one_worker() -> None:
    plan = _plan([0.002, 0.001], [150 * MiB, 150 * MiB], [0, 0])
    p = choose_placement("auto", plan, _workers(2, memory=200 * MiB), model="big")
    assert p.mode == "pipeline"
    assert "needs 300.00 MiB" in p.reason and "has 200.00 MiB" in p.reason and "2.00, 1.00 ms" in p.reason
    assert choose_placement("auto", plan, _workers(4, memory=200 * MiB)).mode == "hybrid"
    with pytest.raises(PlacementError, match="a pipeline needs 2 workers .* has 1"):
        choose_placement("auto", plan, _workers(1, memory=200 * MiB))
