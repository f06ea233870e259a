"""dask-infer on a worker of one thread against a plain PyTorch loop on one thread, in one run.

A worker started with one thread (``dask worker --nthreads 1``, dask-cuda's default) is
where Dask's thread accounting shows: it runs at most one task at a time, whichever
executor runs it. dask-infer's model tasks run on their own compute executor and give
their worker's thread back while they run (``dask_infer/workflows/slots.py``), so the
worker reads the next chunk and writes the last one beside the model. This script times
both sides on the same Zarr store (uint8, zstd) with one torch thread each, by turns
``--repeats`` times on one warm cluster, and prints, from Dask's task stream, where the
worker's model thread spent each run (computing, waiting between chunks).

The plain loop is ``cpu_throughput.plain_loop``: read a chunk, normalise, forward, write,
one after the other. Every round's dask-infer logits are checked against that round's
plain loop (max relative error at most 1e-5, fp32 rounding); outside it the script exits
with status 1 and one ``OUTPUT CHECK FAILED`` line.

    python benchmarks/one_thread.py [--model resnet50] [--images 128] [--chunk 8] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import zarr
from _common import (
    StealMeter,
    Tolerance,
    bench_parser,
    compare_logits,
    exit_if_failed,
    lanes_line,
    machine_info,
    machine_line,
    model_lanes,
)
from cpu_throughput import plain_loop
from distributed import Client, LocalCluster, get_task_stream

import dask_infer
from dask_infer.io import write_sample
from dask_infer.models import build_model
from dask_infer.workflows.cluster import worker_environ

# The same fp32 model and weights on the same images; only batching and threads differ.
TOLERANCE = Tolerance(max_rel_err=1e-5)


def _ours(client: Client, images: str, output: str, weights: str, args: Any) -> dict[str, Any]:
    steal = StealMeter()
    with get_task_stream(client) as stream:
        summary = dask_infer.run(
            images,
            output,
            model=args.model,
            weights=weights,
            client=client,
            chunk_size=args.chunk,
            batch_size=args.chunk,
            device="cpu",
            progress=False,
            echo=None,
        )
    threads = set(client.run(torch.get_num_threads).values())
    assert threads == {1}, f"torch threads on the worker: {threads}"
    lanes = model_lanes(stream.data, args.images)
    return {
        "images_per_s": summary.images_per_second,
        "seconds": summary.seconds,
        "cpu_stolen": steal.share(),
        "lanes": lanes,
    }


def main() -> None:
    parser = bench_parser(__doc__, model="resnet50", images=128, size=224, chunk=8, repeats=3)
    args = parser.parse_args()
    machine = machine_info()
    print(machine_line(machine), flush=True)
    work = Path(tempfile.mkdtemp(prefix="dask-infer-one-thread-"))
    try:
        images = str(work / "images.zarr")
        write_sample(images, kind="photos", size=args.size, count=args.images, chunk=args.chunk)
        weights = str(work / "weights.pt")
        torch.save(
            {
                "state_dict": build_model(args.model).module.state_dict(),
                "meta": {"model": args.model, "input_size": args.size},
            },
            weights,
        )
        torch.set_num_threads(1)
        rounds: list[dict[str, Any]] = []
        checks = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}))
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=1,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=":0",
                )
            )
            client = stack.enter_context(Client(cluster))
            for r in range(1, args.repeats + 1):
                steal = StealMeter()
                plain_s = plain_loop(images, str(work / f"plain-{r}.zarr"), args.model, weights, args.chunk)
                plain = {"images_per_s": args.images / plain_s, "cpu_stolen": steal.share()}
                ours = _ours(client, images, str(work / f"ours-{r}.zarr"), weights, args)
                rounds.append({"round": r, "plain": plain, "dask_infer": ours})
                print(
                    f"round {r}: plain loop {plain['images_per_s']:.2f} images/s, "
                    f"dask-infer {ours['images_per_s']:.2f} "
                    f"({ours['images_per_s'] / plain['images_per_s']:.2f}x)",
                    flush=True,
                )
                print(lanes_line(ours["lanes"]), flush=True)
                checks.append(
                    compare_logits(
                        f"dask-infer logits, round {r}",
                        zarr.open_group(str(work / f"ours-{r}.zarr"), mode="r")["logits"][:],
                        zarr.open_array(str(work / f"plain-{r}.zarr"), mode="r")[:],
                        TOLERANCE,
                        reference="plain PyTorch loop",
                    )
                )
                print(checks[-1].line(), flush=True)
        ratios = [t["dask_infer"]["images_per_s"] / t["plain"]["images_per_s"] for t in rounds]
        waits = [t["dask_infer"]["lanes"]["waits_share"] for t in rounds]
        result = {
            "model": args.model,
            "images": args.images,
            "size": args.size,
            "chunk": args.chunk,
            "machine_info": machine,
            "rounds": rounds,
            "ratio_rounds": ratios,
            "ratio_median": float(np.median(ratios)),
            "waits_share_median": float(np.median(waits)),
            "output_checks": [c.to_dict() for c in checks],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"dask-infer on one one-thread worker / plain loop on one thread: {result['ratio_median']:.2f}x "
        "(median of " + ", ".join(f"{r:.2f}" for r in ratios) + "); the model thread waited "
        f"{100 * result['waits_share_median']:.1f}% of its span between chunks (median)"
    )
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    exit_if_failed(checks, "one_thread.py")


if __name__ == "__main__":
    main()
