"""Monitoring pieces: NVML skipped without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dask_infer.workflows.monitor import GpuSampler
from dask_infer.workflows.summary import write_summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_nvml_is_skipped_without_a_gpu(tmp_path: Path) -> None:
    sampler = GpuSampler(interval=0.01)
    assert sampler.start() is False
    assert sampler.stats() is None
    sampler.stop()
    write_summary(str(tmp_path / "s" / "summary.json"), {"gpus": {}, "images": 3})
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["images"] == 3
