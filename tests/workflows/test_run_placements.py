"""Placements on a real cluster whose workers carry stand-in GPU resources.

Four single-threaded worker processes, each labelled ``GPU: 1`` as a dask-cuda worker
would be, so data-parallel, pipeline and hybrid placements run here without a GPU.
Where tasks ran is read from the scheduler's own transition records.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from dask.utils import key_split
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from dask_infer.io.dataset import write_image_dataset
from dask_infer.partition import profile_memo
from dask_infer.workflows.placement import PlacementError
from dask_infer.workflows.progress_page import run_progress
from tests.conftest import gpu_labelled, random_images
from tests.reference import assert_close_logits, reference_logits, run_small


class _WhereTasksRan(SchedulerPlugin):
    """Records (key, worker) whenever a task's result lands in a worker's memory."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):  # type: ignore[no-untyped-def]
        if finish != "memory":
            return
        worker = kwargs.get("worker")
        if worker is None:
            ts = self.scheduler.tasks.get(key)
            worker = next(iter(ts.who_has)).address if ts is not None and ts.who_has else None
        self.records.append((str(key), str(worker)))


@pytest.fixture(scope="module")
def gpu_client() -> Iterator[Client]:
    with gpu_labelled(4) as client:
        client.register_plugin(_WhereTasksRan(), name="where-tasks-ran")
        yield client


def _records(client: Client) -> list[tuple[str, str]]:
    records = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins["where-tasks-ran"].records
    )
    return [tuple(r) for r in records]  # type: ignore[misc]


def _stage_tasks(records: list[tuple[str, str]], stage: int, seen: int) -> list[tuple[int, str]]:
    """(chunk index, worker) of stage ``stage``'s tasks among the records after ``seen``."""
    prefix = f"s{stage}_resnet18"
    return [(int(k.rsplit("-", 1)[1]), w) for k, w in records[seen:] if key_split(k) == prefix]


def _assert_stages_ran_on_their_workers(
    records: list[tuple[str, str]], seen: int, placement: dict[str, Any], chunks: range
) -> None:
    groups = placement["groups"]
    for k in range(placement["num_stages"]):
        ran = [(i, w) for i, w in _stage_tasks(records, k, seen) if i in chunks]
        assert len(ran) == len(chunks), f"stage {k}: {len(ran)} tasks for {len(chunks)} chunks"
        for i, worker in ran:
            allowed = groups[i % len(groups)][k]
            assert worker in allowed, f"stage {k} of chunk {i} ran on {worker}, not on {allowed}"


def test_every_placement_gives_the_whole_models_predictions(
    gpu_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    whole = run_small(gpu_client, small_dataset, tmp_path / "whole.zarr", small_weights, chunk_size=8)
    want = xr.open_zarr(tmp_path / "whole.zarr")["logits"].values
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(want, reference_logits(images, "resnet18", str(small_weights)))
    assert whole.placement["mode"] == "data" and whole.model_loads == 4

    auto = run_small(gpu_client, small_dataset, tmp_path / "auto.zarr", small_weights, chunk_size=8, stages=2)
    assert auto.placement["mode"] == "data" and "no activations move" in auto.placement["reason"]
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "auto.zarr")["logits"].values, want)

    for mode, extra in [("pipeline", {}), ("hybrid", {"replicas": 2})]:
        seen = len(_records(gpu_client))
        report, summary_file = tmp_path / f"{mode}.html", tmp_path / f"{mode}.json"
        summary = run_small(
            gpu_client,
            small_dataset,
            tmp_path / f"{mode}.zarr",
            small_weights,
            chunk_size=8,
            stages=2,
            placement=mode,
            rebalance=False,
            report=str(report),
            summary=str(summary_file),
            **extra,
        )
        got = xr.open_zarr(tmp_path / f"{mode}.zarr")
        np.testing.assert_array_equal(got["logits"].values, want)
        np.testing.assert_array_equal(
            got["top_k_class"].values, xr.open_zarr(tmp_path / "whole.zarr")["top_k_class"].values
        )
        placement = summary.placement
        assert placement["mode"] == mode and placement["replicas"] == (2 if mode == "hybrid" else 1)
        _assert_stages_ran_on_their_workers(_records(gpu_client), seen, placement, range(summary.chunks))
        # each worker loaded exactly the stages placed on it
        held: dict[str, list[int]] = {}
        for replica in placement["groups"]:
            for k, group in enumerate(replica):
                for w in group:
                    held.setdefault(w, []).append(k)
        assert summary.loaded_stages == held and summary.model_loads == 4
        assert [s["images"] for s in summary.stage_stats] == [200, 200]
        assert all(s["busy_s"] > 0 and s["images_per_s_busy"] > 0 for s in summary.stage_stats)
        assert json.loads(summary_file.read_text())["placement"]["groups"] == placement["groups"]
        assert "s1_resnet18" in report.with_name(f"{mode}.dask.html").read_text() and summary.gpus == {}
        assert json.loads(got.attrs["placement"])["mode"] == mode


def test_rebalance_recuts_an_unbalanced_pipeline(
    gpu_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """Balancing by parameters puts most of ResNet-18's time in stage 0; the run re-cuts it."""
    src = tmp_path / "fine.zarr"
    write_image_dataset(str(src), random_images(200, seed=7), chunk=4)
    run_small(gpu_client, src, tmp_path / "whole.zarr", small_weights, chunk_size=4)
    seen = len(_records(gpu_client))
    lines: list[str] = []
    summary = run_small(
        gpu_client,
        src,
        tmp_path / "hybrid.zarr",
        small_weights,
        echo=lines.append,
        chunk_size=4,
        stages=2,
        balance="params",
        placement="hybrid",
        rebalance=1.25,
    )
    rebalance = summary.rebalance
    assert rebalance is not None and rebalance["recut"], rebalance["before"]
    before, after = rebalance["before"], rebalance["after"]
    assert before["imbalance"] > 1.25 and before["cut_points"] != after["cut_points"]
    assert after["predicted_imbalance"] < before["imbalance"]
    # What the re-cut achieved, measured on the workers over the chunks run on the new cut,
    # not what the optimiser predicted. An imbalance is a ratio of stage times taken on the
    # same workers over the same chunks, so a slowdown from other processes on a shared
    # machine scales both stages and cancels; seen here: 1.42 before, 1.11 to 1.13 after.
    measured = after["stage_seconds_per_image"]
    assert len(measured) == 2 and all(t > 0 for t in measured), measured
    assert after["imbalance"] < before["imbalance"], (before, after)
    assert any(line.startswith("rebalance:") and "re-cut at" in line for line in lines)
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "hybrid.zarr")["logits"].values,
        xr.open_zarr(tmp_path / "whole.zarr")["logits"].values,
    )
    switch = rebalance["chunks_before"]
    assert 0 < rebalance["chunks_measured"] < switch < summary.chunks
    # The feed never paused: the window (twice the measured wave) plus one chunk per
    # chunk written went out under the old cut while the new one was computed.
    assert switch >= 3 * rebalance["chunks_measured"]
    records = _records(gpu_client)
    _assert_stages_ran_on_their_workers(records, seen, before["placement"], range(switch))
    _assert_stages_ran_on_their_workers(records, seen, after["placement"], range(switch, summary.chunks))
    plan = json.loads(xr.open_zarr(tmp_path / "hybrid.zarr").attrs["rebalance"])
    assert plan["after"]["cut_points"] == after["cut_points"]


def test_a_failed_recut_keeps_the_run_going(
    small_dataset: Path, small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-cut task fails on the worker: the run goes on with its cut, and says so."""
    import dask_infer.workflows.rebalance as rebalance_module

    def broken(*args: Any) -> None:
        raise RuntimeError("profiling ran out of memory")

    # In-process workers, so the patched task body is the one they run.
    monkeypatch.setattr(rebalance_module, "_recut_here", broken)
    # The stages' measured times are whatever the shared process gives them (two in-process
    # workers can come out even): the judgement always sees an imbalance, so a re-cut is tried.
    monkeypatch.setattr(rebalance_module, "imbalance", lambda costs: 2.0)
    src = tmp_path / "fine.zarr"
    write_image_dataset(str(src), random_images(120, seed=3), chunk=4)
    lines: list[str] = []
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            resources={"GPU": 1},
            processes=False,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        whole = run_small(client, src, tmp_path / "whole.zarr", small_weights, chunk_size=4)
        summary = run_small(
            client,
            src,
            tmp_path / "pipe.zarr",
            small_weights,
            echo=lines.append,
            chunk_size=4,
            stages=2,
            balance="params",
            placement="pipeline",
            rebalance=1.01,
        )
    assert any("re-cut failed (RuntimeError: profiling ran out of memory)" in line for line in lines), lines
    assert summary.rebalance is not None and not summary.rebalance["recut"]
    assert summary.images == whole.images == 120
    np.testing.assert_array_equal(
        xr.open_zarr(tmp_path / "pipe.zarr")["logits"].values,
        xr.open_zarr(tmp_path / "whole.zarr")["logits"].values,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"stages": 5, "placement": "pipeline"},
            r"pipeline needs 5 GPU-labelled workers \(1 per stage\) but the cluster has 4; use --stages 4",
        ),
        (
            {"stages": 2, "placement": "hybrid", "replicas": 3},
            r"hybrid needs 6 GPU-labelled workers \(3 replicas x 2 stages\) but the cluster has 4",
        ),
        (
            {"stages": 2, "placement": "data", "batch_size": 10**7},
            r"puts the whole model on tcp://.*, which needs [0-9.]+ TiB .*for batch 10000000.*"
            r" \(memory_limit\)",
        ),
    ],
)
def test_placements_that_cannot_work_fail_before_work(
    gpu_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path, kwargs: dict, match: str
) -> None:
    seen = len(_records(gpu_client))
    with pytest.raises(PlacementError, match=match):
        run_small(gpu_client, small_dataset, tmp_path / "o.zarr", small_weights, **kwargs)
    assert not (tmp_path / "o.zarr").exists()
    assert _records(gpu_client)[seen:] == []


def test_cli_placement_options(
    gpu_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from dask_infer.cli import main

    address = gpu_client.scheduler_info()["address"]
    args = ["run", "--input", str(small_dataset), "--model", "resnet18", "--weights", str(small_weights)]
    args += ["--scheduler", address, "--no-progress", "--stages", "2"]
    bad = CliRunner().invoke(
        main, [*args, "--output", str(tmp_path / "bad.zarr"), "--placement", "hybrid", "--replicas", "3"]
    )
    assert bad.exit_code == 2 and "hybrid needs 6 GPU-labelled workers" in bad.output
    good = CliRunner().invoke(
        main,
        [
            *args,
            "--output",
            str(tmp_path / "o.zarr"),
            "--placement",
            "pipeline",
            "--no-rebalance",
            "--summary",
            str(tmp_path / "s.json"),
        ],
    )
    assert good.exit_code == 0, good.output + "".join(
        traceback.format_exception(*good.exc_info or (None,) * 3)
    )
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["placement"]["mode"] == "pipeline" and summary["rebalance"] is None
    assert "placement: pipeline" in good.output and "stage 1:" in good.output


class _ChunksInFlight(SchedulerPlugin):
    """Peak number of chunks the scheduler knows to have been read but not yet written."""

    def __init__(self) -> None:
        self.reads: set[str] = set()
        self.written = 0
        self.peak = 0

    def transition(self, key, start, finish, *args, **kwargs):  # type: ignore[no-untyped-def]
        name = str(key)
        if name.startswith("read-"):
            self.reads.add(name)
        elif name.startswith("write-") and finish == "memory":
            self.written += 1
        self.peak = max(self.peak, len(self.reads) - self.written)


def test_a_pipeline_keeps_a_bounded_window_of_chunks_in_flight(
    gpu_client: Client, small_weights: Path, tmp_path: Path
) -> None:
    src = tmp_path / "long.zarr"
    write_image_dataset(str(src), random_images(240, seed=8), chunk=2)
    gpu_client.register_plugin(_ChunksInFlight(), name="chunks-in-flight")
    try:
        summary = run_small(
            gpu_client,
            src,
            tmp_path / "o.zarr",
            small_weights,
            chunk_size=2,
            stages=2,
            placement="pipeline",
            rebalance=False,
        )
        peak = gpu_client.run_on_scheduler(
            lambda dask_scheduler: dask_scheduler.plugins["chunks-in-flight"].peak
        )
    finally:
        gpu_client.unregister_scheduler_plugin("chunks-in-flight")
    assert summary.chunks == 120
    assert 2 <= peak <= 8, f"{peak} chunks in flight"
    # The dashboard's dask-infer page counts the whole run, not the window: every group 120.
    run = run_progress(gpu_client)[0]
    assert run["status"] == "finished" and run["chunks"] == 120 and run["images"] == 240
    assert [(g["name"], g["done"]) for g in run["groups"]] == [
        ("read", 120),
        ("s0_resnet18", 120),
        ("s1_resnet18", 120),
        ("write", 120),
    ]


def test_a_second_pipeline_on_the_same_workers_reuses_their_profile(
    gpu_client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """A time-balanced CPU pipeline profiles its model on a stage worker; run again on the same
    workers, that worker takes the costs it measured and the outputs stay the whole model's."""
    gpu_client.run(profile_memo.forget)
    hits = sum(gpu_client.run(profile_memo.hits).values())  # counted since each worker started
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    want = reference_logits(images, "resnet18", str(small_weights))
    said: list[list[str]] = []
    for run in ("first", "second"):
        lines: list[str] = []
        run_small(
            gpu_client,
            small_dataset,
            tmp_path / f"{run}.zarr",
            small_weights,
            chunk_size=8,
            stages=2,
            placement="pipeline",
            rebalance=False,
            echo=lines.append,
        )
        said.append([line for line in lines if line.startswith("re-profiled on")])
        assert_close_logits(xr.open_zarr(tmp_path / f"{run}.zarr")["logits"].values, want)
    assert len(said[0]) == len(said[1]) == 1
    assert "(measured)" in said[0][0]
    assert "(costs it measured for an earlier run)" in said[1][0]
    assert sum(gpu_client.run(profile_memo.hits).values()) == hits + 1
