"""What this CPU does well: its model name, torch's kernel level and the flags compression relies on.

bf16 runs fast on ``amx_bf16`` or ``avx512_bf16``, fp16 on ``amx_fp16`` or ``avx512_fp16``,
int8 on ``amx_int8``, ``avx512_vnni`` or ``avx_vnni``; without them those dtypes are
emulated and may be slower than fp32.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RELEVANT_FLAGS", "CpuFeatures", "cpu_features"]

RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
    "amx_tile",
)
"""The ``/proc/cpuinfo`` flags that decide which precision is fast."""


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU as compression sees it.

    Attributes
    ----------
    model
        ``model name`` from ``/proc/cpuinfo`` (the platform's processor string elsewhere).
    capability
        ``torch.backends.cpu.get_cpu_capability()``, e.g. ``"AVX512"`` or ``"AVX512_BF16"``.
    flags
        Those of :data:`RELEVANT_FLAGS` the CPU has, in that order.
    """

    model: str
    capability: str
    flags: tuple[str, ...]

    @property
    def fast_bf16(self) -> bool:
        """Whether the CPU has bf16 instructions (AMX or AVX-512)."""
        return bool({"amx_bf16", "avx512_bf16"} & set(self.flags))

    @property
    def fast_fp16(self) -> bool:
        """Whether the CPU has fp16 arithmetic instructions (AMX or AVX-512)."""
        return bool({"amx_fp16", "avx512_fp16"} & set(self.flags))

    @property
    def fast_int8(self) -> bool:
        """Whether the CPU has int8 dot-product instructions (AMX or VNNI)."""
        return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & set(self.flags))

    def describe(self) -> str:
        """One line: model, torch's kernel level and the relevant flags."""
        return f"{self.model}; torch CPU capability {self.capability}; flags {' '.join(self.flags) or 'none'}"


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This machine's :class:`CpuFeatures` (flags are empty where ``cpuinfo`` cannot be read)."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return CpuFeatures(
        model=model,
        capability=str(torch.backends.cpu.get_cpu_capability()),
        flags=tuple(f for f in RELEVANT_FLAGS if f in flags),
    )
