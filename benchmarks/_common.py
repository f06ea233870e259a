"""Shared by the benchmark scripts: what machine ran them, checks of their outputs, and where
a run's model threads spent their time (from Dask's task stream).

A benchmark's ratio means nothing if the faster side computes something else, so every
script compares its outputs with the plain PyTorch reference it is timed against and
exits non-zero with one line (``OUTPUT CHECK FAILED: ...``) when they disagree beyond
the tolerance it states. The scripts are run as ``python benchmarks/NAME.py``, which puts
this folder on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dask_infer.workflows.cores import usable_cores

__all__ = [
    "Check",
    "StealMeter",
    "Tolerance",
    "compare_logits",
    "cpu_flags",
    "cpu_model",
    "covered",
    "exit_if_failed",
    "lanes_line",
    "machine_info",
    "machine_line",
    "model_lanes",
]

# The /proc/cpuinfo flags that decide which kernels fp32, bf16, fp16 and int8 get on x86.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


def _cpuinfo_field(name: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Those of :data:`RELEVANT_FLAGS` this CPU has (empty where ``/proc/cpuinfo`` is missing)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in RELEVANT_FLAGS if f in flags]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, the flags that matter to low-precision kernels, torch and its CPU path."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": capability,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": load,
    }


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the CPU and its flags, for the top of a benchmark's output."""
    info = info or machine_info()
    flags = " ".join(info["cpu_flags"]) or "none of " + " ".join(RELEVANT_FLAGS)
    load = info["load_average_1m"]
    return (
        f"CPU: {info['cpu_model']} ({info['machine']}, {info['cpus']} cores"
        + (
            ""
            if info.get("usable_cores", info["cpus"]) == info["cpus"]
            else f", {info['usable_cores']} usable"
        )
        + f"); flags: {flags}; "
        f"torch {info['torch']} (CPU path {info['torch_cpu_capability']}), Python {info['python']}"
        + ("" if load is None else f"; load average {load:.2f}")
    )


class StealMeter:
    """The share of this machine's CPU time its hypervisor gave to other guests over an interval.

    A virtual machine's cores are shared with its neighbours: the ``steal`` column of
    ``/proc/stat`` counts the time they took. Runs that lose a few percent to it are slower
    for reasons outside the code being timed, so each timed figure is printed beside it.
    ``share()`` is ``None`` where ``/proc/stat`` cannot be read.
    """

    def __init__(self) -> None:
        self._start = self._ticks()

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except (OSError, IndexError):
            return None
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        return (ticks[7], sum(ticks)) if len(ticks) == 8 else None

    def share(self) -> float | None:
        """Stolen share of all CPU time since this meter was made."""
        end = self._ticks()
        if self._start is None or end is None or end[1] == self._start[1]:
            return None
        return (end[0] - self._start[0]) / (end[1] - self._start[1])


@dataclass(frozen=True)
class Tolerance:
    """How far outputs may stray from their reference.

    Parameters
    ----------
    max_rel_err
        Largest ``max|got - ref| / max|ref|`` allowed, or ``None`` for no bound.
    min_agreement
        Smallest fraction of rows whose top-1 (argmax) matches the reference, or ``None``.
    exact
        Require bit-identical outputs.
    """

    max_rel_err: float | None = None
    min_agreement: float | None = None
    exact: bool = False

    def __str__(self) -> str:
        parts = ["bit-identical"] if self.exact else []
        if self.max_rel_err is not None:
            parts.append(f"max rel err <= {self.max_rel_err:g}")
        if self.min_agreement is not None:
            parts.append(f"top-1 agreement >= {100 * self.min_agreement:g}%")
        return ", ".join(parts) or "no bound"


@dataclass(frozen=True)
class Check:
    """The outcome of comparing one output with its reference."""

    what: str
    reference: str
    tolerance: Tolerance
    rows: int
    max_abs_err: float
    max_rel_err: float
    agreement: float
    identical: bool
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return (
            f"{status} {self.what} vs {self.reference} on {self.rows} rows: "
            f"max rel err {self.max_rel_err:.2e}, top-1 agreement {100 * self.agreement:.2f}%"
            f"{', bit-identical' if self.identical else ''}{self.note} (tolerance: {self.tolerance})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "reference": self.reference,
            "tolerance": str(self.tolerance),
            "rows": self.rows,
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "top1_agreement": self.agreement,
            "bit_identical": self.identical,
            "ok": self.ok,
            "note": self.note.strip("; "),
        }


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def compare_logits(what: str, got: Any, ref: Any, tolerance: Tolerance, *, reference: str) -> Check:
    """Compare logits ``got`` (N, classes) with ``ref``; a shape mismatch or NaN fails."""
    g, r = _as_numpy(got), _as_numpy(ref)
    if g.shape != r.shape or g.size == 0:
        note = f"; shape {g.shape} where the reference has {r.shape}"
        return Check(
            what, reference, tolerance, r.shape[0] if r.ndim else 0, np.inf, np.inf, 0.0, False, False, note
        )
    rows = g.reshape(len(g), -1) if g.ndim > 1 else g.reshape(1, -1)
    refs = r.reshape(len(r), -1) if r.ndim > 1 else r.reshape(1, -1)
    finite = bool(np.isfinite(g).all() and np.isfinite(r).all())
    max_abs = float(np.abs(g - r).max()) if finite else float("inf")
    scale = float(np.abs(r).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    agreement = float((rows.argmax(1) == refs.argmax(1)).mean())
    identical = bool(np.array_equal(g, r))
    ok = finite
    if tolerance.exact:
        ok = ok and identical
    if tolerance.max_rel_err is not None:
        ok = ok and max_rel <= tolerance.max_rel_err
    if tolerance.min_agreement is not None:
        ok = ok and agreement >= tolerance.min_agreement
    return Check(what, reference, tolerance, len(refs), max_abs, max_rel, agreement, identical, ok)


def exit_if_failed(checks: list[Check], benchmark: str) -> None:
    """Exit with status 1 and one line naming every failed check; return if all passed."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return
    detail = "; ".join(
        f"{c.what} vs {c.reference}: rel err {c.max_rel_err:.2e}, agreement {100 * c.agreement:.2f}%"
        f"{c.note} (needs {c.tolerance})"
        for c in failed
    )
    sys.stdout.flush()
    raise SystemExit(
        f"OUTPUT CHECK FAILED ({benchmark}, {len(failed)} of {len(checks)}): {detail}; "
        "the timings above compare different computations and must not be reported"
    )


# Keys of the tasks that run the model: whole-model chunks and stage k's chunks (dask_infer.workflows.graph).
MODEL_TASK = re.compile(r"^(infer|s(\d+))_")


def covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of ``spans``.

    A task's compute span starts when its worker hands it to the compute executor, so a
    model task waiting there for the one before it overlaps that one's span.
    """
    covered, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered


def model_lanes(stream: list[dict[str, Any]], images: int) -> dict[str, Any]:
    """Where each worker's model thread spent a run, from Dask's task stream.

    The span runs from the first model task's start to the last one's end, on any
    worker. Each worker's share of it splits into ``compute_s`` (covered by its model tasks),
    ``fill_s`` (before its first model task: stage 1 waiting for stage 0's first chunk),
    ``waits_s`` (between its model tasks) and ``drain_s`` (after its last: stage 0 idle
    while stage 1 finishes). ``transfer_s`` sums the fetches of the inputs of its model
    tasks from other workers (a pipeline's activations), which run beside its compute.
    ``steady_images_per_s`` is the rate with the lanes' fill and drain taken out.
    """
    lanes: dict[str, dict[str, Any]] = {}
    for task in stream:
        match = MODEL_TASK.match(str(task["key"]))
        if match is None:
            continue
        lane = lanes.setdefault(
            task["worker"], {"stages": set(), "spans": [], "transfer_s": 0.0, "transfers": 0}
        )
        lane["stages"].add("whole" if match.group(2) is None else int(match.group(2)))
        for part in task["startstops"]:
            if part["action"] == "compute":
                lane["spans"].append((part["start"], part["stop"]))
            elif part["action"] == "transfer":
                lane["transfer_s"] += part["stop"] - part["start"]
                lane["transfers"] += 1
    if not lanes:
        return {}
    start = min(a for lane in lanes.values() for a, _ in lane["spans"])
    stop = max(b for lane in lanes.values() for _, b in lane["spans"])
    span = stop - start
    rows = []
    for worker, lane in lanes.items():
        first = min(a for a, _ in lane["spans"])
        last = max(b for _, b in lane["spans"])
        compute = covered(lane["spans"])
        rows.append(
            {
                "worker": worker,
                "stages": sorted(lane["stages"], key=str),
                "tasks": len(lane["spans"]),
                "compute_s": compute,
                "fill_s": first - start,
                "waits_s": (last - first) - compute,
                "drain_s": stop - last,
                "transfer_s": lane["transfer_s"],
                "transfers": lane["transfers"],
            }
        )
    rows.sort(key=lambda r: (str(r["stages"]), r["worker"]))
    total = span * len(rows)
    ends = sum(r["fill_s"] + r["drain_s"] for r in rows)
    shares = {
        f"{part}_share": sum(r[f"{part}_s"] for r in rows) / total if total > 0 else 0.0
        for part in ("compute", "fill", "waits", "drain")
    }
    return {
        "span_s": span,
        "lanes": rows,
        **shares,
        "steady_images_per_s": images / (span - ends / len(rows)) if span > ends / len(rows) else 0.0,
    }


def lanes_line(lanes: dict[str, Any]) -> str:
    """One line of :func:`model_lanes`: each worker's compute, fill, waits, drain and transfers."""
    parts = [
        f"{'stage ' + str(r['stages'][0]) if r['stages'] != ['whole'] else 'worker'}: "
        f"compute {r['compute_s']:.1f} s, fill {r['fill_s']:.2f}, waits {r['waits_s']:.2f}, "
        f"drain {r['drain_s']:.2f}" + (f", transfers {r['transfer_s']:.2f} s" if r["transfers"] else "")
        for r in lanes["lanes"]
    ]
    return f"           model span {lanes['span_s']:.1f} s; " + "; ".join(parts)


_KINDS: dict[str, type] = {"model": str, "recipes": str}


def bench_parser(doc: str | None, **defaults: Any) -> argparse.ArgumentParser:
    """A parser whose description is ``doc``'s first line, with ``--NAME`` for each of ``defaults``.

    Each option takes its default's type (``--model resnet50``, ``--images 256``, ...);
    every benchmark also gets ``--json FILE`` to write its figures to. A script adds
    options of its own to the parser it gets.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=_KINDS.get(name, type(default)), default=default)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser
