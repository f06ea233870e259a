"""A pipeline that loses a stage's worker (restarted by its nanny, or gone with it) goes on.

Each run is compared with an undisturbed run of the same pipeline on the same cluster:
the logits must be identical, and no chunk written before the loss is submitted again.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

import dask_infer.workflows.recovery as recovery_module
from dask_infer.io.dataset import write_image_dataset
from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.recovery import WorkersLostError
from tests.conftest import random_images
from tests.faults import WriteCounter, after_chunks_written
from tests.reference import run_small

PIPELINE: dict[str, Any] = {
    "chunk_size": 4,
    "stages": 2,
    "balance": "params",
    "placement": "pipeline",
    "rebalance": False,
}


def _cluster(n: int) -> LocalCluster:
    return LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    )


def _killer(cluster: LocalCluster, client: Client, victim: str) -> Callable[[], None]:
    """Kills worker ``victim`` so that nothing restarts it: its nanny (in this process for a
    LocalCluster) is told not to, as if it had died too, and the worker process is SIGKILLed."""
    pid = client.run(os.getpid, workers=[victim])[victim]
    nanny = next(n for n in cluster.workers.values() if n.worker_address == victim)

    def kill() -> None:
        nanny.close_gracefully(reason="test: the nanny is gone")
        os.kill(pid, signal.SIGKILL)

    return kill


def _logits(path: Path) -> np.ndarray:
    return xr.open_zarr(path)["logits"].values


def test_a_stage_worker_killed_mid_run_is_restarted_and_the_stages_placed_again(
    small_weights: Path, tmp_path: Path
) -> None:
    """SIGKILL the process of one stage's only worker: its nanny restarts it under a new address,
    the stages are placed again on the two workers, and only chunks not yet written run again."""
    src = tmp_path / "long.zarr"
    write_image_dataset(str(src), random_images(240, seed=21), chunk=4)
    lines: list[str] = []
    with _cluster(2) as cluster, Client(cluster) as client:
        calm = run_small(client, src, tmp_path / "calm.zarr", small_weights, **PIPELINE)
        assert not calm.recoveries
        pids = client.run(os.getpid)
        victim = sorted(pids)[-1]
        counter = WriteCounter()
        cluster.scheduler.add_plugin(counter)
        with after_chunks_written(
            tmp_path / "hit.zarr", 6, lambda: os.kill(pids[victim], signal.SIGKILL)
        ) as killed:
            summary = run_small(
                client, src, tmp_path / "hit.zarr", small_weights, echo=lines.append, **PIPELINE
            )
        assert killed.is_set(), "the run ended before a worker could be killed"
    assert len(counter.writes) <= 60 and not counter.rewritten(), counter.writes
    assert len(summary.recoveries) == 1, summary.recoveries
    record = summary.recoveries[0]
    assert record["lost"] == [victim]
    assert victim not in str(record["placement_after"]["groups"])
    assert len(record["placement_after"]["groups"][0]) == 2  # the restarted worker holds a stage again
    # Only chunks in flight and not written were submitted again: at most one window (8 chunks).
    assert record["written_before"] >= 6
    assert 0 < len(record["resubmitted"]) <= 8
    assert any(line.startswith(f"lost worker(s) {victim} (stage 1)") for line in lines), lines
    np.testing.assert_array_equal(_logits(tmp_path / "hit.zarr"), _logits(tmp_path / "calm.zarr"))
    assert xr.open_zarr(tmp_path / "hit.zarr").attrs["dask_infer_complete"] is True


def test_a_stage_worker_lost_with_its_nanny_leaves_the_stages_on_the_others(
    small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill a worker and its nanny in a 3-worker pipeline: nothing brings it back, so the two
    stages go on the two workers left."""
    monkeypatch.setattr(recovery_module, "RESTART_GRACE_S", 1.0)
    src = tmp_path / "long.zarr"
    write_image_dataset(str(src), random_images(240, seed=22), chunk=4)
    with _cluster(3) as cluster, Client(cluster) as client:
        calm = run_small(client, src, tmp_path / "calm.zarr", small_weights, **PIPELINE)
        workers = sorted(scheduler_workers(client))
        assert not calm.recoveries
        victim = workers[-1]
        kill_both = _killer(cluster, client, victim)
        counter = WriteCounter()
        cluster.scheduler.add_plugin(counter)
        with after_chunks_written(tmp_path / "hit.zarr", 6, kill_both) as killed:
            summary = run_small(client, src, tmp_path / "hit.zarr", small_weights, **PIPELINE)
        assert killed.is_set(), "the run ended before a worker could be killed"
    assert len(counter.writes) <= 60 and not counter.rewritten(), counter.writes
    assert [r["lost"] for r in summary.recoveries] == [[victim]], summary.recoveries
    groups = summary.recoveries[0]["placement_after"]["groups"][0]
    assert sorted(w for g in groups for w in g) == [w for w in workers if w != victim]
    np.testing.assert_array_equal(_logits(tmp_path / "hit.zarr"), _logits(tmp_path / "calm.zarr"))


def test_too_few_workers_left_stops_with_a_resume_line(
    small_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-stage pipeline left with one worker stops in one line that says how to resume; the resume
    on a cluster with two workers again completes the output like an undisturbed run."""
    monkeypatch.setattr(recovery_module, "RESTART_GRACE_S", 0.5)
    monkeypatch.setattr(recovery_module, "RESTART_WAIT_S", 2.0)
    src = tmp_path / "long.zarr"
    write_image_dataset(str(src), random_images(240, seed=23), chunk=4)
    with _cluster(2) as cluster, Client(cluster) as client:
        victim = sorted(scheduler_workers(client))[-1]
        kill_both = _killer(cluster, client, victim)
        with (
            after_chunks_written(tmp_path / "hit.zarr", 6, kill_both),
            pytest.raises(WorkersLostError, match=r"needs 2 workers \(1 per stage\) and 1 are left") as err,
        ):
            run_small(client, src, tmp_path / "hit.zarr", small_weights, **PIPELINE)
    assert "rerun the same command with --resume" in str(err.value)
    assert "\n" not in str(err.value)
    with _cluster(2) as cluster, Client(cluster) as client:
        resumed = run_small(client, src, tmp_path / "hit.zarr", small_weights, resume=True, **PIPELINE)
        run_small(client, src, tmp_path / "calm.zarr", small_weights, **PIPELINE)
    assert resumed.skipped_chunks >= 6
    np.testing.assert_array_equal(_logits(tmp_path / "hit.zarr"), _logits(tmp_path / "calm.zarr"))


def test_a_worker_that_joins_a_pipeline_gets_a_stage(small_weights: Path, tmp_path: Path) -> None:
    """Scale a 2-worker pipeline to 3 mid-run: its stages are placed again over the three workers,
    the newcomer loads its stage, and no written chunk is written again."""
    src = tmp_path / "long.zarr"
    write_image_dataset(str(src), random_images(240, seed=24), chunk=4)
    with _cluster(2) as cluster, Client(cluster) as client:
        calm = run_small(client, src, tmp_path / "calm.zarr", small_weights, **PIPELINE)
        first = set(scheduler_workers(client))
        counter = WriteCounter()
        cluster.scheduler.add_plugin(counter)
        with after_chunks_written(tmp_path / "hit.zarr", 6, lambda: cluster.scale(3)) as scaled:
            summary = run_small(client, src, tmp_path / "hit.zarr", small_weights, **PIPELINE)
        assert scaled.is_set(), "the run ended before the cluster could grow"
    assert not calm.recoveries
    assert len(counter.writes) <= 60 and not counter.rewritten(), counter.writes
    (record,) = summary.recoveries
    assert record["lost"] == [] and len(record["joined"]) == 1 and record["joined"][0] not in first
    groups = record["placement_after"]["groups"][0]
    assert sorted(w for g in groups for w in g) == sorted([*first, *record["joined"]])
    assert record["joined"][0] in summary.loaded_stages and summary.loaded_stages[record["joined"][0]]
    np.testing.assert_array_equal(_logits(tmp_path / "hit.zarr"), _logits(tmp_path / "calm.zarr"))
