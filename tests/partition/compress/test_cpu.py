"""The CPU's model, torch's kernel level and the flags that decide which precision is fast."""

from __future__ import annotations

from pathlib import Path

import torch

from dask_infer.partition.compress.cpu import RELEVANT_FLAGS, cpu_features

_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni avx512vl
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni avx512vl
"""


def test_features_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(_CPUINFO)
    features = cpu_features(info)
    assert features.model == "AMD EPYC 9B14"
    assert features.flags == ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni")
    assert features.capability == torch.backends.cpu.get_cpu_capability()
    assert features.fast_bf16 and features.fast_int8 and not features.fast_fp16
    assert "avx512_bf16" in features.describe() and "AMD EPYC 9B14" in features.describe()


def test_unreadable_cpuinfo_gives_no_flags(tmp_path: Path) -> None:
    features = cpu_features(tmp_path / "missing")
    assert features.flags == () and not features.fast_bf16 and features.model


def test_this_machine() -> None:
    features = cpu_features()
    assert set(features.flags) <= set(RELEVANT_FLAGS)
