"""dask-infer against a plain PyTorch loop over the same Zarr dataset, in one run.

Both read the same Zarr store (uint8, zstd), preprocess, run the same model with the
same weights, and write logits to a new Zarr store. The plain loop is what a user
writes by hand: read a chunk, normalise, forward in batches, write. Every round's
dask-infer logits are checked against that round's plain loop (max relative error
``max|got - ref| / max|ref|`` at most 1e-5, i.e. fp32 rounding); outside it the script
exits with status 1 and one ``OUTPUT CHECK FAILED`` line.

    python benchmarks/cpu_throughput.py [--model resnet50] [--images 256] [--json out.json]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from _common import Tolerance, bench_parser, compare_logits, exit_if_failed, machine_info, machine_line

import dask_infer
from dask_infer.io import write_sample
from dask_infer.models import build_model
from dask_infer.workflows.cores import usable_cores

# Both sides compute fp32 with the same weights on the same images; only batching, memory
# layout and thread count may differ, so their logits must agree to fp32 rounding.
TOLERANCE = Tolerance(max_rel_err=1e-5)


def plain_loop(images_url: str, output_url: str, model_name: str, weights: str, batch: int) -> float:
    """Hand-written loop: chunk by chunk, normalise, forward, write.

    Returns the seconds after the model is built, as dask-infer's summary counts them.
    """
    loaded = build_model(model_name, weights=weights)
    start = time.perf_counter()
    model = loaded.module
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    src = zarr.open_group(images_url, mode="r")["images"]
    n, step = src.shape[0], src.chunks[0]
    out = zarr.create_array(
        output_url, shape=(n, loaded.num_classes), chunks=(step, loaded.num_classes), dtype="float32"
    )
    with torch.inference_mode():
        for s in range(0, n, step):
            block = torch.from_numpy(np.asarray(src[s : s + step]))
            logits = []
            for i in range(0, block.shape[0], batch):
                x = block[i : i + batch].permute(0, 3, 1, 2).float().div(255)
                logits.append(model((x - mean) / std))
            out[s : s + block.shape[0]] = torch.cat(logits).numpy()
    return time.perf_counter() - start


def main() -> None:
    parser = bench_parser(__doc__, model="resnet50", images=256, size=224, chunk=32, batch=32, repeats=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dask-infer-bench-"))
    try:
        images = str(work / "images.zarr")
        write_sample(images, kind="photos", size=args.size, count=args.images, chunk=args.chunk)
        weights = str(work / "weights.pt")
        model = build_model(args.model).module
        # The input size travels with the weights, so dask-infer runs the model at --size as the
        # plain loop does (a bare state dict would make it resize to the model's default).
        torch.save(
            {"state_dict": model.state_dict(), "meta": {"model": args.model, "input_size": args.size}},
            weights,
        )

        torch.set_num_threads(usable_cores())
        plain, ours, ours_total = [], [], []
        for r in range(args.repeats):
            plain.append(plain_loop(images, str(work / f"plain-{r}.zarr"), args.model, weights, args.batch))
            t0 = time.perf_counter()
            summary = dask_infer.run(
                images,
                str(work / f"ours-{r}.zarr"),
                model=args.model,
                weights=weights,
                batch_size=args.batch,
                progress=False,
                echo=None,
            )
            ours_total.append(time.perf_counter() - t0)
            ours.append(summary.seconds)
        # Every round's dask-infer logits against that round's plain loop (the reference it is timed against).
        checks = [
            compare_logits(
                f"dask-infer logits, round {r + 1}",
                zarr.open_group(str(work / f"ours-{r}.zarr"), mode="r")["logits"][:],
                zarr.open_array(str(work / f"plain-{r}.zarr"), mode="r")[:],
                TOLERANCE,
                reference="plain PyTorch loop",
            )
            for r in range(args.repeats)
        ]
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU",
            "machine_info": machine_info(),
            "model": args.model,
            "images": args.images,
            "size": args.size,
            "storage_chunk": args.chunk,
            "plain_loop_images_per_s": args.images / min(plain),
            "dask_infer_images_per_s": args.images / min(ours),
            "dask_infer_with_cluster_start_images_per_s": args.images / min(ours_total),
            "ratio": min(plain) / min(ours),
            "ratio_with_cluster_start": min(plain) / min(ours_total),
            "cluster": summary.cluster,
            "max_abs_logit_diff": max(c.max_abs_err for c in checks),
            "max_rel_logit_err": max(c.max_rel_err for c in checks),
            "output_checks": [c.to_dict() for c in checks],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(machine_line(result["machine_info"]))
    for c in checks:
        print(c.line())
    print(
        f"dask-infer / plain loop: {result['ratio']:.2f}x "
        f"({result['ratio_with_cluster_start']:.2f}x with cluster start)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    exit_if_failed(checks, "cpu_throughput.py")


if __name__ == "__main__":
    main()
