"""Pipeline placement against the whole model on one worker and against data-parallel, in one run.

fp32 on the CPU (or every stage compressed by ``--compress``), the same model, weights and
Zarr dataset for all three:

- whole: the whole model on 1 single-threaded worker;
- pipeline: 2 stages, each on its own single-threaded worker, activations passed between them;
- data: the whole model on each of 2 single-threaded workers.

Every worker computes with one torch thread. Throughput counts from the first task to
the last write, after the workers have loaded their stages. The three take turns
``--repeats`` times and each keeps its best run: on a shared machine, other load only
ever slows a run down.

Outputs are checked every round: the pipeline's and data-parallel's logits must be
bit-identical to the whole model's, and the whole model's logits on the first
``--check-images`` images must match a plain PyTorch forward (``Preprocess`` then the
model, in this process) to fp32 rounding (max relative error ``max|got - ref| / max|ref|``
at most 1e-5). With ``--compress``, data-parallel must still equal the whole model
bit for bit (the same compiled model on each worker); the pipeline's stages are compiled
apart, so it and the whole model meet the plain fp32 forward within the recipe's bound
(bf16 5e-2, int8 1e-1). Outside any check, the script exits with status 1 and one
``OUTPUT CHECK FAILED`` line.

    python benchmarks/pipeline.py [--model resnet50] [--images 256] [--chunk 8] [--repeats 2]
                                  [--compress bf16+channels_last+compile] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr
from _common import Check, Tolerance, compare_logits, exit_if_failed, machine_info, machine_line
from distributed import Client, LocalCluster

import dask_infer
from dask_infer.io import write_image_dataset
from dask_infer.models import Preprocess, build_model
from dask_infer.partition.compress.recipe import CompressionRecipe
from dask_infer.workflows.cluster import worker_environ

# Placements change where the same ops run, not what they compute: bit-identical.
SAME_OUTPUT = Tolerance(exact=True)
# Plain PyTorch in this process: same fp32 ops, other batching and thread count.
PLAIN_FP32 = Tolerance(max_rel_err=1e-5)
# A compressed model against the plain fp32 forward.
COMPRESSED = {"bf16": Tolerance(max_rel_err=5e-2), "fp16": Tolerance(max_rel_err=5e-2)}
INT8 = Tolerance(max_rel_err=1e-1)


def _run(
    name: str, workers: int, images: str, output: str, weights: str, args: argparse.Namespace, **kw: Any
) -> dict[str, Any]:
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}),
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        summary = dask_infer.run(
            images,
            output,
            model=args.model,
            weights=weights,
            client=client,
            chunk_size=args.chunk,
            batch_size=args.chunk,
            progress=False,
            echo=None,
            compress=args.compress,
            device="cpu",
            **kw,
        )
        threads = client.run(torch.get_num_threads)
    assert set(threads.values()) == {1}, f"{name}: torch threads per worker {threads}"
    row = {
        "run": name,
        "workers": workers,
        "images_per_s": summary.images_per_second,
        "seconds": summary.seconds,
        "placement": summary.placement["mode"],
        "stages": [
            {k: s[k] for k in ("stage", "busy_s", "work_s", "busy_fraction", "images_per_s_busy")}
            for s in summary.stage_stats
        ],
        "rebalance": summary.rebalance,
    }
    print(
        f"{name:>9}: {summary.images_per_second:6.2f} images/s ({summary.seconds:.1f} s, {workers} worker(s))"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument(
        "--images",
        type=int,
        default=256,
        help="dataset size; a pipeline fills and drains once per run, about 1/(chunks+1) of it",
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--chunk",
        type=int,
        default=8,
        help="images per task and per forward pass (dask-infer picks 16 for ResNet-50 on a CPU)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three runs; the best is kept")
    parser.add_argument(
        "--check-images",
        type=int,
        default=16,
        help="images whose logits are also checked against a plain PyTorch forward",
    )
    parser.add_argument(
        "--compress",
        default=None,
        help="a recipe every stage runs with in all three runs, e.g. bf16+channels_last+compile",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.compress:
        recipe = CompressionRecipe.parse(args.compress)
        bound = INT8 if recipe.quantize else COMPRESSED.get(recipe.precision, PLAIN_FP32)
    else:
        bound = PLAIN_FP32

    machine = machine_info()
    print(machine_line(machine), flush=True)
    work = Path(tempfile.mkdtemp(prefix="dask-infer-pipeline-"))
    try:
        images = str(work / "images.zarr")
        pixels = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
        write_image_dataset(images, pixels, chunk=args.chunk)
        weights = str(work / f"{args.model}.pt")
        loaded = build_model(args.model, seed=0)
        torch.save(
            {
                "state_dict": loaded.module.state_dict(),
                "meta": {"model": args.model, "input_size": args.size},
            },
            weights,
        )
        checked = max(1, min(args.check_images, args.images))
        prep = Preprocess(args.size, loaded.mean, loaded.std)
        with torch.no_grad():
            reference = torch.cat(
                [
                    loaded.module(prep(torch.from_numpy(pixels[i : min(i + args.chunk, checked)])))
                    for i in range(0, checked, args.chunk)
                ]
            ).numpy()
        checks: list[Check] = []
        every: list[dict[str, Any]] = []
        names = ("whole", "pipeline", "data")
        for round_ in range(1, args.repeats + 1):
            every.append(_run("whole", 1, images, str(work / "whole.zarr"), weights, args, overwrite=True))
            every.append(
                _run(
                    "pipeline",
                    2,
                    images,
                    str(work / "pipeline.zarr"),
                    weights,
                    args,
                    stages=2,
                    placement="pipeline",
                    overwrite=True,
                )
            )
            every.append(
                _run(
                    "data",
                    2,
                    images,
                    str(work / "data.zarr"),
                    weights,
                    args,
                    placement="data",
                    overwrite=True,
                )
            )
            logits = {name: xr.open_zarr(str(work / f"{name}.zarr"))["logits"].values for name in names}
            against_plain = ("whole", "pipeline") if args.compress else ("whole",)
            checks += [
                compare_logits(
                    f"{name}, round {round_}, first {checked} images",
                    logits[name][:checked],
                    reference,
                    bound,
                    reference="plain PyTorch fp32 forward",
                )
                for name in against_plain
            ]
            checks += [
                compare_logits(
                    f"{name}, round {round_}", logits[name], logits["whole"], SAME_OUTPUT, reference="whole"
                )
                for name in (("data",) if args.compress else ("pipeline", "data"))
            ]
            for c in checks[-3:]:
                print(c.line(), flush=True)
            exit_if_failed(checks, "pipeline.py")
        runs = [
            max((r for r in every if r["run"] == name), key=lambda r: r["images_per_s"]) for name in names
        ]
        speed = {r["run"]: r["images_per_s"] for r in runs}
        ratios = {
            "pipeline_over_whole": speed["pipeline"] / speed["whole"],
            "pipeline_over_data": speed["pipeline"] / speed["data"],
            "data_over_whole": speed["data"] / speed["whole"],
        }
        print(
            f"pipeline / whole: {ratios['pipeline_over_whole']:.2f}x   "
            f"pipeline / data-parallel: {ratios['pipeline_over_data']:.2f}x   "
            f"data-parallel / whole: {ratios['data_over_whole']:.2f}x   "
            f"(best of {args.repeats}; logits checked, see above)"
        )
        result = {
            "model": args.model,
            "compress": args.compress,
            "images": args.images,
            "size": args.size,
            "chunk": args.chunk,
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "load_average_1m": os.getloadavg()[0],
                "torch": torch.__version__,
            },
            "machine_info": machine,
            "output_checks": [c.to_dict() for c in checks],
            "repeats": args.repeats,
            "runs": runs,
            "all_runs": [{k: r[k] for k in ("run", "images_per_s", "seconds")} for r in every],
            "ratios": ratios,
        }
        print(json.dumps(result, indent=2, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
