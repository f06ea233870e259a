"""Page faults and time of a forward pass on a worker thread: glibc defaults against CPU worker settings.

A CPU worker runs its model on a thread of its own, not the main thread. This script runs
the same plain PyTorch forward pass (a torchvision model, random weights, one batch of
random images) on a worker thread in a fresh process, once with glibc's allocator left
as it is and once with the environment dask-infer gives the CPU workers it starts
(``worker_environ(keep_freed_bytes(1))``), by turns ``--pairs`` times. Each process
warms up, then times ``--passes`` passes and counts their minor page faults
(``/proc/self/stat``). The outputs of the two must be bit-identical: the allocator
changes where tensors live, not what is computed.

    python benchmarks/allocator.py [--model resnet50] [--batch 16] [--threads 1] [--pairs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import machine_info, machine_line

from dask_infer.workflows.cluster import keep_freed_bytes, worker_environ


def _faults() -> int:
    return int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[7])


def _child(args: argparse.Namespace) -> None:
    """In a fresh process: warm up, time ``passes`` forward passes on a thread, print JSON."""
    import torch

    from dask_infer.models import build_model

    torch.set_num_threads(args.threads)
    model = build_model(args.model, seed=0).module.eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    found: dict[str, Any] = {}

    def work() -> None:
        with torch.inference_mode():
            out = model(x)
            model(x)
            seconds, faults = [], []
            for _ in range(args.passes):
                f, t = _faults(), time.perf_counter()
                out = model(x)
                seconds.append(time.perf_counter() - t)
                faults.append(_faults() - f)
        found.update(seconds=seconds, faults=faults, output=hashlib.sha256(out.numpy().tobytes()).hexdigest())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(json.dumps(found))


def _run(args: argparse.Namespace, environ: dict[str, object]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({k: str(v) for k, v in environ.items()})
    command = [sys.executable, __file__, "--child", *sys.argv[1:]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16, help="images per pass (dask-infer's CPU default)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--passes", type=int, default=6, help="timed passes per process")
    parser.add_argument("--pairs", type=int, default=3, help="processes of each kind, by turns")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    machine = machine_info()
    print(machine_line(machine), flush=True)
    kinds = {
        "glibc defaults": {k: v for k, v in worker_environ().items() if not k.startswith("MALLOC_")},
        "CPU worker settings": worker_environ(keep_freed_bytes(1)),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in kinds}
    for pair in range(1, args.pairs + 1):
        for name, environ in kinds.items():
            found = _run(args, environ)
            runs[name].append(found)
            print(
                f"pair {pair}, {name:>19}: {1e3 * statistics.median(found['seconds']):7.1f} ms per pass, "
                f"{statistics.median(found['faults']):9.0f} page faults per pass",
                flush=True,
            )
    outputs = {found["output"] for name in runs for found in runs[name]}
    if len(outputs) != 1:
        print("OUTPUT CHECK FAILED: the two allocators gave different outputs", file=sys.stderr)
        sys.exit(1)
    summary = {
        name: {
            "ms_per_pass_median": 1e3 * statistics.median(s for f in found for s in f["seconds"]),
            "faults_per_pass_median": statistics.median(x for f in found for x in f["faults"]),
        }
        for name, found in runs.items()
    }
    before, after = summary["glibc defaults"], summary["CPU worker settings"]
    ratio = before["ms_per_pass_median"] / after["ms_per_pass_median"]
    print(
        f"CPU worker settings: {ratio:.3f}x the speed of glibc's defaults (median pass), "
        f"{after['faults_per_pass_median']:.0f} against {before['faults_per_pass_median']:.0f} page faults "
        "per pass; outputs bit-identical"
    )
    result = {
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "threads": args.threads,
        "passes": args.passes,
        "pairs": args.pairs,
        "machine_info": machine,
        "environments": {name: {k: str(v) for k, v in env.items()} for name, env in kinds.items()},
        "summary": summary,
        "speed_ratio": ratio,
        "runs": runs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
