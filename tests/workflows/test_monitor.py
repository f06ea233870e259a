"""Monitoring pieces: stage figures from literal runtime stats, NVML skipped without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed import Client, Event

from dask_infer.workflows.monitor import GpuSampler, gpu_summary, stage_summary, track, write_summary


def test_stage_summary_sums_workers_per_stage() -> None:
    stats = {
        "tcp://a": {"stages": {0: {"chunks": 4, "images": 40, "busy_s": 2.0, "work_s": 1.5}}, "gpu": None},
        "tcp://b": {"stages": {0: {"chunks": 6, "images": 60, "busy_s": 3.0, "work_s": 2.5}}, "gpu": None},
        "tcp://c": {"stages": {1: {"chunks": 10, "images": 100, "busy_s": 4.0, "work_s": 4.0}}, "gpu": None},
    }
    rows = stage_summary(stats, seconds=10.0, num_stages=2)
    assert rows[0]["workers"] == ["tcp://a", "tcp://b"] and rows[0]["images"] == 100
    assert rows[0]["busy_fraction"] == pytest.approx(5.0 / 20.0)
    assert rows[0]["work_seconds_per_image"] == pytest.approx(0.04)
    assert rows[0]["images_per_s_busy"] == pytest.approx(20.0)
    assert rows[1]["busy_fraction"] == pytest.approx(0.4) and rows[1]["images_per_s"] == pytest.approx(10.0)
    assert gpu_summary(stats) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_nvml_is_skipped_without_a_gpu(tmp_path: Path) -> None:
    sampler = GpuSampler(interval=0.01)
    assert sampler.start() is False
    assert sampler.stats() is None
    sampler.stop()
    write_summary(str(tmp_path / "s" / "summary.json"), {"gpus": {}, "images": 3})
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["images"] == 3


def _wait_for(name: str) -> int:
    Event(name).wait()
    return 1


def _fail() -> int:
    raise ValueError("chunk 3 is corrupt")


def test_a_failed_chunk_cancels_the_rest(client: Client) -> None:
    stuck = [client.submit(_wait_for, "never-set", key=f"stuck-{i}", pure=False) for i in range(3)]
    done: list[int] = []
    with pytest.raises(ValueError, match="chunk 3 is corrupt"):
        track([*stuck, client.submit(_fail, pure=False)], progress=False, on_done=done.append)
    assert done == []
    assert [f.status for f in stuck] == ["cancelled"] * 3
