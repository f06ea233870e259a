"""A two-stage pipeline whose best cut is uneven shares the block around the balance between its
two workers, chunk by chunk."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torchvision
import xarray as xr
from distributed import get_task_stream

from dask_infer.errors import ModelError
from dask_infer.partition import StagePlan, format_plan, partition_model
from dask_infer.partition.balance import SHARED_LEAD, boundary_share, imbalance, shared_loads
from dask_infer.workflows import placement as placement_module
from dask_infer.workflows import run as run_module
from dask_infer.workflows.placement import (
    Placement,
    PlacementError,
    WorkerInfo,
    on_workers,
    share_boundary,
)
from dask_infer.workflows.rebalance import RESHARE_STEP, measured_share
from tests.conftest import gpu_labelled
from tests.reference import run_small

A, B, C = "tcp://a:1", "tcp://b:1", "tcp://c:1"


def test_the_share_evens_the_two_workers() -> None:
    # 4 + f*2 == 5 + (1 - f)*2  ->  f = 0.75
    assert boundary_share(4.0, 2.0, 5.0) == 0.75
    # the first worker lighter by the lead: 4 + f*2 == 0.9 * (5 + (1 - f)*2)
    f = boundary_share(4.0, 2.0, 5.0, lead=0.1)
    assert 4 + 2 * f == pytest.approx(0.9 * (5 + 2 * (1 - f)))
    assert boundary_share(9.0, 1.0, 1.0) == 0.0 and boundary_share(1.0, 1.0, 9.0) == 1.0
    assert boundary_share(3.0, 0.0, 3.0) == 0.5
    assert shared_loads([4.0, 2.0, 5.0], 1) == (5.5, 5.5)


@pytest.fixture(scope="module")
def shared_plan() -> StagePlan:
    model = torchvision.models.resnet18(num_classes=10).eval()
    # Any imbalance above 1.0 shares the block; verify (the default) checks the stages bit for bit.
    plan = partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1, share_boundary=1.0, name="resnet18")
    return plan.plan


def test_the_plan_cuts_around_the_balance_and_shares_the_block_between(shared_plan: StagePlan) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    plan = shared_plan
    assert plan.num_stages == 3 and plan.shared_stage == 1
    times = plan.stage_costs
    # The single cut is one of the two; each side of the shared block is under half the work.
    assert sum(times[:1]) < sum(times) / 2 < sum(times[:2])
    # The imbalance is the routed split's, with the first worker SHARED_LEAD lighter.
    assert plan.imbalance == pytest.approx(imbalance(shared_loads(times, 1, SHARED_LEAD)))
    assert f"{plan.imbalance:.3f}" in format_plan(plan)
    # With times that leave the share inside (0, 1) whatever this machine measured: the first
    # worker takes (1 - SHARED_LEAD) of what the second takes.
    even = dataclasses.replace(
        plan,
        stages=tuple(
            dataclasses.replace(st, time_s=t) for st, t in zip(plan.stages, (4.0, 2.0, 5.0), strict=True)
        ),
    )
    first, second = shared_loads(even.stage_costs, 1, SHARED_LEAD)
    assert first == pytest.approx((1 - SHARED_LEAD) * second)
    assert even.imbalance == pytest.approx(2 / (2 - SHARED_LEAD))
    assert f"{even.imbalance:.3f}" in format_plan(even)
    assert StagePlan.from_dict(plan.to_dict()) == plan
    assert "stage 1 is shared chunk by chunk by the workers of stages 0 and 2" in format_plan(plan)
    one = partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1, share_boundary=100.0).plan
    assert one.num_stages == 2 and one.shared_stage is None
    with pytest.raises(ModelError, match=r"share_boundary=0.5 must be a stage imbalance >= 1"):
        partition_model(model, 2, sample=(2, 3, 64, 64), repeats=1, share_boundary=0.5)


def test_the_placement_routes_the_shared_stage_chunk_by_chunk(shared_plan: StagePlan) -> None:
    two = Placement("pipeline", (((A,), (B,)),), "2 stages on 2 workers")
    workers = [WorkerInfo(w, 0) for w in (A, B)]
    placed = share_boundary(two, shared_plan, workers, batch_size=2)
    assert placed.groups == (((A,), (A, B), (B,)),)
    assert placed.stages_on() == {A: (0, 1), B: (1, 2)}
    stage, share = placed.shared or (None, 0.0)
    times = shared_plan.stage_costs
    assert stage == 1 and share == boundary_share(times[0], times[1], times[2], SHARED_LEAD)
    firsts = [placed.route(1, i) == (A,) for i in range(200)]
    assert abs(sum(firsts) - 200 * share) <= 1
    assert all(placed.route(1, i) in ((A,), (B,)) for i in range(200))
    assert placed.route(0, 7) == (A,) and placed.route(2, 7) == (B,)
    assert placed.regrouped([1.0, 1.0, 1.0]) is placed
    assert placed.to_dict()["shared"] == {"stage": 1, "share": share}
    # After a worker is lost, the stages are placed again on two of those present, still
    # shared; the survivor keeps its role and the stages it holds, the newcomer takes the other.
    again = on_workers(placed, [WorkerInfo(w, 0) for w in (B, C)], times)
    assert again.groups == (((C,), (C, B), (B,)),) and again.shared is not None
    assert on_workers(placed, [WorkerInfo(w, 0) for w in (C, A)], times).groups == (((A,), (A, C), (C,)),)
    # A worker joining changes nothing.
    assert on_workers(placed, [WorkerInfo(w, 0) for w in (C, B, A)], times).groups == placed.groups
    with pytest.raises(PlacementError, match="shares stage 1 between 2 workers and 1 is left"):
        on_workers(placed, [WorkerInfo(B, 0)], times)
    with pytest.raises(PlacementError, match="a shared boundary stage needs a pipeline of 2 stages"):
        share_boundary(Placement("pipeline", (((A,), (B, C)),), ""), shared_plan, workers, batch_size=2)


def _shared_run(
    monkeypatch: pytest.MonkeyPatch, share: float, data: Path, weights: Path, tmp_path: Path, **kw: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The small ResNet-18 run whole, then as a pipeline whose block between its two cuts is
    shared, planned with ``share`` of it on the first worker whatever this machine's profile
    says; on two one-thread workers. Returns the pipeline's summary and task stream, after
    checking that its logits are the whole model's bit for bit (fp32, the same ops)."""
    # Shared for any imbalance, and for this uncompiled model too.
    monkeypatch.setattr(run_module, "SHARE_BOUNDARY", 1.0)
    monkeypatch.setattr(run_module, "_may_share_boundary", lambda compress, placement: True)
    monkeypatch.setattr(placement_module, "boundary_share", lambda *args: share)
    with gpu_labelled(2) as client:
        whole = run_small(client, data, tmp_path / "whole.zarr", weights, chunk_size=8)
        with get_task_stream(client) as stream:
            summary = run_small(
                client,
                data,
                tmp_path / "pipe.zarr",
                weights,
                chunk_size=8,
                stages=2,
                placement="pipeline",
                balance="time",
                **kw,
            )
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "pipe.zarr")["logits"].values,
        xr.open_zarr(tmp_path / "whole.zarr")["logits"].values,
    )
    assert whole.images == summary.images == 200
    return summary, stream.data


def test_a_run_with_a_shared_stage_writes_what_the_whole_model_does(
    monkeypatch: pytest.MonkeyPatch, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """The block between the two cuts runs on each worker for some chunks, and the logits
    are the whole model's. Without ``rebalance`` the share stays as planned (half the
    chunks on each worker; the share itself is tested above)."""
    summary, stream = _shared_run(monkeypatch, 0.5, small_dataset, small_weights, tmp_path, rebalance=False)
    assert summary.placement["shared"] == {"stage": 1, "share": 0.5} and summary.rebalance is None
    ran: dict[str, int] = {}
    for task in stream:
        if str(task["key"]).startswith("s1_"):
            ran[task["worker"]] = ran.get(task["worker"], 0) + 1
    assert sorted(ran.values()) == [12, 13], ran  # 200 images in chunks of 8, half on each


def test_the_measured_share_evens_the_two_workers_with_the_first_ahead() -> None:
    f = measured_share([4.0, 2.0, 5.0], 1)
    assert f is not None and 4 + 2 * f == pytest.approx((1 - SHARED_LEAD) * (5 + 2 * (1 - f)))
    assert measured_share([1.0, 1.0, 9.0], 1) == 1.0 and measured_share([9.0, 1.0, 1.0], 1) == 0.0
    # A stage not yet timed, or times for fewer stages: nothing to go by.
    assert measured_share([4.0, 0.0, 5.0], 1) is None and measured_share([4.0], 1) is None


def test_a_shared_stage_is_routed_again_by_measured_times(
    monkeypatch: pytest.MonkeyPatch, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """Planned with the whole shared block on the first worker (as a profile taken apart
    from the run can leave it), the run measures its stages and sends the block of later
    chunks to the second worker too, by the measured times; the logits stay the whole model's."""
    lines: list[str] = []
    summary, stream = _shared_run(monkeypatch, 1.0, small_dataset, small_weights, tmp_path, echo=lines.append)
    rebalance = summary.rebalance
    assert rebalance is not None and rebalance["reshare"] and rebalance["stage"] == 1
    shares, measured = rebalance["shares"], rebalance["stage_seconds_per_image"]
    assert shares[0] == 1.0 and len(shares) >= 2, lines
    # The last share set is the one the last measured times give, within the step kept.
    expected = measured_share(measured, 1)
    assert expected is not None and abs(shares[-1] - expected) < RESHARE_STEP + 1e-9
    assert rebalance["placement_after"]["shared"] == {"stage": 1, "share": shares[-1]}
    assert rebalance["placement_before"]["shared"] == {"stage": 1, "share": 1.0}
    assert any("share on its first worker 100% -> " in line for line in lines), lines
    first = rebalance["placement_after"]["groups"][0][0][0]
    assert {t["worker"] for t in stream if str(t["key"]).startswith("s0_")} == {first}
    keys = [(str(t["key"]), t["worker"]) for t in stream]
    s1 = {int(key.rsplit("-", 1)[1]): worker for key, worker in keys if key.startswith("s1_")}
    assert len(s1) == 25
    # The first window (8 chunks) was sent before anything was measured: all on the first worker.
    assert all(s1[i] == first for i in range(8)), s1
    assert any(w != first for w in s1.values()), s1
    assert "share on its first worker, set from measured stage times: 100% -> " in summary.format_stages()


def test_compiled_stages_of_one_recipe_may_share_a_boundary_but_int8_ones_do_not() -> None:
    """int8 stages are profiled in fp32, which cannot say how uneven their single cut is."""
    two = Placement("pipeline", (((A,), (B,)),), "2 stages on 2 workers")
    assert run_module._may_share_boundary("bf16+channels_last+compile", two)
    assert run_module._may_share_boundary("fp32+compile", two)
    assert not run_module._may_share_boundary("int8+compile", two)
    assert not run_module._may_share_boundary("bf16", two)  # not compiled: priced as it runs
    assert not run_module._may_share_boundary(None, two)
    three = Placement("pipeline", (((A,), (B, C)),), "2 stages on 3 workers")
    assert not run_module._may_share_boundary("bf16+compile", three)
