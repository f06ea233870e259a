"""Per-stage figures from literal runtime stats."""

from __future__ import annotations

import pytest

from dask_infer.workflows.summary import format_stages, gpu_summary, stage_summary


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


def test_stage_summary_gives_the_bytes_each_stage_passes_on() -> None:
    stats = {
        "tcp://a": {"stages": {0: {"images": 8, "busy_s": 1.0, "work_s": 1.0, "sent_bytes": 8 * 401408}}},
        "tcp://b": {"stages": {1: {"images": 8, "busy_s": 1.0, "work_s": 1.0, "sent_bytes": 0}}},
    }
    rows = stage_summary(stats, seconds=2.0, num_stages=2)
    assert rows[0]["sent_bytes"] == 8 * 401408 and rows[0]["sent_bytes_per_image"] == 401408
    assert rows[1]["sent_bytes_per_image"] == 0
    first, last = format_stages(rows).splitlines()
    assert first.endswith(", passes 392.00 kiB per image on") and "passes" not in last
