"""A pipeline balanced by time is profiled in the precision and layout its stages compute in."""

from __future__ import annotations

import pytest

from dask_infer.workflows import run as run_module
from dask_infer.workflows.run import _boundary_width, _partition_here, _profiled_as, _profiled_fused


def test_the_profile_takes_the_recipe_all_stages_share() -> None:
    assert _profiled_as("bf16+channels_last+compile", 2) == ("bf16", True)
    assert _profiled_as("fp16", 3) == ("fp16", False)
    # int8 graphs are not the model's layers; stages that differ, auto and none: fp32.
    assert _profiled_as("int8+compile", 2) == ("fp32", False)
    assert _profiled_as("0:bf16,1:fp32", 2) == ("fp32", False)
    assert _profiled_as("auto", 2) == ("fp32", False)
    assert _profiled_as(None, 2) == ("fp32", False)


def test_int8_boundaries_are_priced_at_a_quarter_of_the_fp32_profile_bytes() -> None:
    """Between int8 stages the activation travels as uint8; the fp32 profile measured 4 bytes."""
    assert _boundary_width("int8+compile", 3) == 0.25
    assert _boundary_width("0:int8,1:bf16", 2) == 1.0
    assert _boundary_width("bf16+compile", 2) == 1.0
    assert _boundary_width("auto", 2) == 1.0
    assert _boundary_width(None, 2) == 1.0


def test_the_profile_is_fused_where_every_stage_compiles() -> None:
    assert _profiled_fused("bf16+channels_last+compile", 2)
    assert _profiled_fused("int8+compile", 3)
    assert not _profiled_fused("0:bf16+compile,1:bf16", 2)
    assert not _profiled_fused("bf16+channels_last", 2)
    assert not _profiled_fused("auto", 2)
    assert not _profiled_fused(None, 2)


def test_a_fused_profile_on_the_worker_never_cuts_before_a_relu() -> None:
    plan = _partition_here("resnet18", None, 10, 3, (4, 3, 32, 32), 1, "bf16", True, 0.0, True)
    assert plan["fused"] and len(plan["cut_points"]) == 2
    assert not any(cut.endswith("_add") or "bn" in cut for cut in plan["cut_points"])


def test_a_bf16_profile_gives_a_plan_for_the_runs_input() -> None:
    """Profiled in bf16 channels-last, the plan still names the run's input shape and one cut."""
    plan = _partition_here("resnet18", None, 10, 2, (4, 3, 32, 32), 1, "bf16", True)
    assert len(plan["cut_points"]) == 1 and tuple(plan["input_shape"]) == (4, 3, 32, 32)


def test_the_profile_runs_on_no_more_threads_than_the_worker_has_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A caller's worker of 8 threads on a process allowed 2 cores is profiled with 2 torch threads,
    as its model then runs."""
    seen: list[int | None] = []

    def partition(*args: object, threads: int | None = None, **kwargs: object) -> object:
        seen.append(threads)
        raise _Stop

    monkeypatch.setattr(run_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(run_module, "partition_model", partition)
    for given, want in ((8, 2), (1, 1)):
        with pytest.raises(_Stop):
            _partition_here("resnet18", None, 10, 2, (4, 3, 32, 32), given)
        assert seen.pop() == want


class _Stop(Exception):
    """Ends the profile once its thread count is seen."""
