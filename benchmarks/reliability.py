"""Reliability figures: what an interrupted run costs to resume, and what lost workers cost.

Runs on this machine's CPU, with a small ResNet-18 (random weights, 10 classes, 32x32 input):

1. Resume: ``dask-infer run`` over 10,000 images, undisturbed; then the same run SIGKILLed
   (with its local cluster) once half of its chunks are written, and ``--resume``d. The
   overhead is (killed part + resume) / undisturbed - 1; chunks recomputed are chunks the
   manifest recorded before the kill that the resume computed again, counted from the images
   the resume's workers ran (must be 0). The resume
   starts a cluster and loads the model again; the overhead is also given without that.
2. Lost workers: a data-parallel run and a 2-stage pipeline on a 2-worker LocalCluster with
   nannies, each with one worker SIGKILLed after a few chunks (the nanny restarts it), timed
   against the same run undisturbed; chunk writes are counted by a scheduler plugin, so a
   chunk written twice shows.

Every disturbed run's logits must equal the undisturbed run's exactly; otherwise the script
prints ``OUTPUT CHECK FAILED`` and exits 1. Results go to
``benchmarks/results/reliability-cpu-<date>.json``.

Usage: ``python benchmarks/reliability.py [--images 10000]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from _common import machine_info, machine_line
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import dask_infer
from dask_infer.errors import InputError
from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.outputs import done_chunks, open_output
from dask_infer.models import build_model

CLI = [sys.executable, "-m", "dask_infer.cli"]


class _Writes(SchedulerPlugin):
    def __init__(self) -> None:
        self.keys: list[str] = []

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "memory" and str(key).startswith("write-"):
            self.keys.append(str(key).rsplit("-", 1)[-1])

    def twice(self) -> int:
        return len(self.keys) - len(set(self.keys))


def _written(output: Path) -> int:
    try:
        return len(done_chunks(open_output(str(output))[0]))
    except InputError:
        return 0


def _when_written(output: Path, chunks: int, action: Callable[[], None]) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and _written(output) < chunks:
            time.sleep(0.02)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _logits(path: Path) -> np.ndarray:
    return xr.open_zarr(path)["logits"].values


def _cli_run(src: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return [
        *CLI,
        "run",
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        str(weights),
        "--workers",
        "2",
        "--threads",
        "1",
        "--chunk-size",
        "128",
        "--no-progress",
        *extra,
    ]


def resume_overhead(src: Path, weights: Path, work: Path, images: int) -> dict[str, Any]:
    """Undisturbed CLI run, then a SIGKILLed one resumed: wall times and chunk counts."""
    calm = work / "calm.zarr"
    t = time.perf_counter()
    calm_summary = work / "calm.json"
    subprocess.run(
        _cli_run(src, calm, weights, "--summary", str(calm_summary)), check=True, capture_output=True
    )
    undisturbed = time.perf_counter() - t
    # What a CLI run spends before its first chunk: starting the cluster, loading the model.
    start_up = undisturbed - json.loads(calm_summary.read_text())["seconds"]
    hit = work / "hit.zarr"
    chunks = -(-images // 128)
    t = time.perf_counter()
    proc = subprocess.Popen(
        _cli_run(src, hit, weights),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _when_written(hit, chunks // 2, lambda: os.killpg(proc.pid, signal.SIGKILL)).join()
    proc.wait()
    killed = time.perf_counter() - t
    time.sleep(2)  # let the killed cluster's last writes land before counting
    before = _written(hit)
    t = time.perf_counter()
    summary_path = work / "resume.json"
    subprocess.run(
        _cli_run(src, hit, weights, "--resume", "--summary", str(summary_path)),
        check=True,
        capture_output=True,
    )
    resumed = time.perf_counter() - t
    summary = json.loads(summary_path.read_text())
    computed = int(summary["stage_stats"][0]["images"])
    return {
        "images": images,
        "chunks": chunks,
        "undisturbed_s": undisturbed,
        "killed_after_s": killed,
        "chunks_written_before_kill": before,
        "resume_s": resumed,
        "chunks_skipped": summary["skipped_chunks"],
        # What the resume's workers really ran, beyond the chunks left to do: computed twice.
        "images_computed_by_resume": computed,
        "chunks_recomputed": (computed - (images - 128 * summary["skipped_chunks"])) // 128
        + (before - summary["skipped_chunks"]),
        "start_up_s": start_up,
        "overhead": (killed + resumed) / undisturbed - 1,
        # The same without the resume's own cluster start and model load, which a run pays once.
        "overhead_beyond_start_up": (killed + resumed - start_up) / undisturbed - 1,
        "identical": bool(np.array_equal(_logits(hit), _logits(calm))),
    }


def lost_worker(src: Path, weights: Path, work: Path, name: str, **options: Any) -> dict[str, Any]:
    """One run undisturbed and one with a worker SIGKILLed after 6 chunks, on one 2-worker cluster."""
    common: dict[str, Any] = {"chunk_size": 64, "progress": False, "echo": None, **options}
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        calm = dask_infer.run(
            str(src),
            str(work / f"{name}-calm.zarr"),
            model="resnet18",
            weights=str(weights),
            client=client,
            **common,
        )
        writes = _Writes()
        cluster.scheduler.add_plugin(writes)
        pids = client.run(os.getpid)
        victim = sorted(pids)[-1]
        out = work / f"{name}-hit.zarr"
        watcher = _when_written(out, 6, lambda: os.kill(pids[victim], signal.SIGKILL))
        hit = dask_infer.run(
            str(src), str(out), model="resnet18", weights=str(weights), client=client, **common
        )
        watcher.join(timeout=5)
    return {
        "run": name,
        "chunks": calm.chunks,
        "undisturbed_s": calm.seconds,
        "disturbed_s": hit.seconds,
        "chunk_writes": len(writes.keys),
        "chunks_written_twice": writes.twice(),
        "recoveries": len(hit.recoveries),
        "resubmitted_in_flight": sum(len(r["resubmitted"]) for r in hit.recoveries),
        "identical": bool(np.array_equal(_logits(out), _logits(work / f"{name}-calm.zarr"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    info = machine_info()
    print(machine_line(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        src = work / "images.zarr"
        write_image_dataset(str(src), images, chunk=128)
        weights = work / "resnet18.pt"
        module = build_model("resnet18", num_classes=10, seed=1).module
        torch.save(
            {"state_dict": module.state_dict(), "meta": {"model": "resnet18", "input_size": 32}}, weights
        )
        resume = resume_overhead(src, weights, work, args.images)
        print(json.dumps(resume), flush=True)
        small = work / "small.zarr"
        write_image_dataset(str(small), images[:1920], chunk=64)
        faults = [
            lost_worker(small, weights, work, "data-parallel"),
            lost_worker(
                small,
                weights,
                work,
                "pipeline",
                stages=2,
                placement="pipeline",
                balance="params",
                rebalance=False,
            ),
        ]
        for row in faults:
            print(json.dumps(row), flush=True)
    result = {"machine": info, "resume": resume, "lost_worker": faults}
    day = time.strftime("%Y-%m-%d")
    path = Path(__file__).parent / "results" / f"reliability-cpu-{day}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    bad = [r["run"] for r in faults if not r["identical"] or r["chunks_written_twice"]]
    if not resume["identical"] or resume["chunks_recomputed"] or bad:
        print(f"OUTPUT CHECK FAILED: resume identical={resume['identical']}, disturbed runs differing: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
