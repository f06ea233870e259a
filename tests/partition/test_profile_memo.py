"""partition_model(reuse_profile=True): a model profiled again with the same shapes measures nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from dask_infer.models import build_model
from dask_infer.partition import partition_model, profile_memo
from dask_infer.partition import partitioner as partitioner_module
from dask_infer.partition.split import ModelGraph

SAMPLE = (2, 3, 32, 32)


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    profile_memo.forget()
    yield
    profile_memo.forget()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the profiles and of the stage checks ``partition_model`` runs."""
    counted = {"profile": 0, "check": 0}
    profile, check = partitioner_module.profile_graph, partitioner_module.run_stages

    def counted_profile(*args: Any, **kwargs: Any) -> Any:
        counted["profile"] += 1
        return profile(*args, **kwargs)

    def counted_check(*args: Any, **kwargs: Any) -> Any:
        counted["check"] += 1
        return check(*args, **kwargs)

    monkeypatch.setattr(partitioner_module, "profile_graph", counted_profile)
    monkeypatch.setattr(partitioner_module, "run_stages", counted_check)
    return counted


def _model() -> torch.nn.Module:
    return build_model("resnet18", num_classes=10, seed=0).module


def test_a_second_profile_of_the_same_model_measures_nothing(calls: dict[str, int]) -> None:
    model = _model()
    first = partition_model(model, 2, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    assert calls == {"profile": 1, "check": 1}
    hits, mine = profile_memo.hits(), profile_memo.thread_hits()
    again = partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    assert calls == {"profile": 1, "check": 1} and profile_memo.hits() == hits + 1
    assert profile_memo.thread_hits() == mine + 1
    # A reuse in another thread (another task on the same worker) counts for the process,
    # not for this thread: a profiling task reports only its own.
    other = threading.Thread(
        target=partition_model,
        args=(_model(), 2),
        kwargs={"sample": SAMPLE, "threads": 1, "repeats": 1, "reuse_profile": True},
    )
    other.start()
    other.join()
    assert profile_memo.hits() == hits + 2 and profile_memo.thread_hits() == mine + 1
    assert again.plan == first.plan
    # The stages built from the kept profile still reproduce the model.
    x = torch.randn(SAMPLE)
    with torch.no_grad():
        torch.testing.assert_close(again.modules[1](again.modules[0](x)), model.eval()(x), rtol=0, atol=0)


def test_new_cuts_from_a_kept_profile_are_checked(calls: dict[str, int]) -> None:
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    three = partition_model(_model(), 3, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    assert calls == {"profile": 1, "check": 2} and len(three.plan.cut_points) == 2


@pytest.mark.parametrize(
    "other",
    [
        {"sample": (4, 3, 32, 32)},
        {"sample": (2, 3, 48, 48)},
        {"threads": 2},
        {"repeats": 2},
    ],
    ids=["batch", "size", "threads", "repeats"],
)
def test_another_sample_or_thread_count_is_measured(calls: dict[str, int], other: dict[str, Any]) -> None:
    given: dict[str, Any] = {"sample": SAMPLE, "threads": 1, "repeats": 1}
    partition_model(_model(), 2, reuse_profile=True, **given)
    partition_model(_model(), 2, reuse_profile=True, **{**given, **other})
    assert calls["profile"] == 2


def test_another_model_is_measured(calls: dict[str, int]) -> None:
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    partition_model(
        build_model("resnet18", num_classes=7, seed=0).module,
        2,
        sample=SAMPLE,
        threads=1,
        repeats=1,
        reuse_profile=True,
    )
    assert calls["profile"] == 2


def test_without_reuse_every_call_measures(calls: dict[str, int]) -> None:
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1, reuse_profile=True)
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1)
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1)
    assert calls == {"profile": 3, "check": 3}


def test_the_memo_keeps_the_measured_costs_not_the_fused_ones() -> None:
    """A fused plan prices pointwise nodes at zero; an unfused plan from the same memo must not."""
    partition_model(_model(), 2, sample=SAMPLE, threads=1, repeats=1, fused=True, reuse_profile=True)
    graph = ModelGraph.trace(_model().eval())
    kept = profile_memo.recall(profile_memo.profile_key(graph, torch.zeros(SAMPLE), 1, 1))
    assert kept is not None
    assert any(c.pointwise and c.time_s > 0 for c in kept.costs)


def test_the_memo_keeps_a_bounded_number_of_profiles() -> None:
    graph = ModelGraph.trace(_model().eval())
    first = profile_memo.profile_key(graph, torch.zeros(SAMPLE), 1, 1)
    kept = profile_memo.Measured(costs=(), output_shape=(2, 10))
    profile_memo.remember(first, kept)
    for batch in range(3, 3 + profile_memo._LIMIT):
        profile_memo.remember(profile_memo.profile_key(graph, torch.zeros(batch, 3, 32, 32), 1, 1), kept)
    assert profile_memo.recall(first) is None
