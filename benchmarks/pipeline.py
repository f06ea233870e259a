"""Pipeline placement against the whole model on one worker and against data-parallel, in one run.

fp32 on the CPU (or every stage compressed by ``--compress``), the same model, weights and
Zarr dataset for all three:

- whole: the whole model on 1 single-threaded worker;
- pipeline: 2 stages, each on its own single-threaded worker, activations passed between them;
- data: the whole model on each of 2 single-threaded workers;
- planned (``--planned-share``): the pipeline again, never rebalanced. A pipeline of compiled
  stages shares its boundary stage between the two workers and routes it by the stage times
  it measures as it runs; this one keeps the share its profile planned.
- fp32-boundary (``--fp32-boundary``, int8 recipes): the pipeline again with its int8 stages
  passing fp32 activations, each quantized by the next stage on receipt, as they did before
  they passed uint8 (``compress_stages(..., int8_boundaries=False)`` on the workers).

Every worker computes with one torch thread. Throughput counts from the first task to
the last write, after the workers have loaded their stages. Two clusters stay up for the
whole script, one of 1 worker (whole) and one of 2 (pipeline and data-parallel), and the
three runs take turns ``--repeats`` times on them: round 1 meets fresh workers, later
rounds warm ones, and pipeline and data-parallel change places each round (pipeline first
in odd rounds), so neither always follows the other on workers it has warmed. On a shared
virtual machine the speed of the same code drifts by 10-20% from minute to minute, so the
script reports, for pipeline against data-parallel (and against the whole model), the
median of the rounds' ratios (each from two runs a few seconds apart) beside the best run
of each against the best of the other. Every run prints the share of the CPU the
hypervisor stole during it, and ``call_s``, the seconds of the whole ``dask_infer.run``
call (start-up included: a pipeline profiles its model on a stage worker first).

Where the time goes, from Dask's task stream of each run: over the span from the first
model task's start to the last one's end, each worker's model thread is computing,
waiting for its first chunk (fill: stage 1 while stage 0 computes the first), waiting
between chunks, or done (drain: stage 0 while stage 1 finishes the last), and fetches
its inputs from the other worker (the pipeline's activations) beside that. The script
prints the median shares for pipeline and data-parallel, and their ratio with fill and
drain taken out, which is what a run of many more chunks approaches.
Beside that, each run's model threads' CPU time (all stages, from the runtime's per-stage
figures): pipeline over data-parallel says how much more work the split model does
(boundaries the compiler cannot fuse over, activations copied in and out), apart from the
wall time its threads wait for a core while activations move.

Outputs are checked every round: the pipeline's and data-parallel's logits must be
bit-identical to the whole model's, and the whole model's logits on the first
``--check-images`` images must match a plain PyTorch forward (``Preprocess`` then the
model, in this process) to fp32 rounding (max relative error ``max|got - ref| / max|ref|``
at most 1e-5). With ``--compress``, data-parallel must still equal the whole model
bit for bit (the same compiled model on each worker); the pipeline's stages are compiled
apart, so it and the whole model meet the plain fp32 forward within the recipe's bound
(bf16 5e-2, int8 1e-1). Outside any check, the script exits with status 1 and one
``OUTPUT CHECK FAILED`` line.

    python benchmarks/pipeline.py [--model resnet50] [--images 256] [--chunk 8] [--repeats 3]
                                  [--compress bf16+channels_last+compile] [--planned-share]
                                  [--fp32-boundary] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr
from _common import (
    Check,
    StealMeter,
    Tolerance,
    compare_logits,
    exit_if_failed,
    lanes_line,
    machine_info,
    machine_line,
    model_lanes,
)
from distributed import Client, LocalCluster, get_task_stream

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


def _cluster(workers: int) -> LocalCluster:
    """``workers`` single-threaded worker processes with the environment dask-infer gives its own."""
    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}):
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
        )


def _run(
    name: str, client: Client, images: str, output: str, weights: str, args: argparse.Namespace, **kw: Any
) -> dict[str, Any]:
    workers = len(client.scheduler_info()["workers"])
    steal = StealMeter()
    start = time.perf_counter()
    with get_task_stream(client) as stream:
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
    call = time.perf_counter() - start
    lanes = model_lanes(stream.data, args.images)
    stolen = steal.share()
    threads = client.run(torch.get_num_threads)
    assert set(threads.values()) == {1}, f"{name}: torch threads per worker {threads}"
    row = {
        "run": name,
        "workers": workers,
        "images_per_s": summary.images_per_second,
        "seconds": summary.seconds,
        "call_s": call,
        "cpu_stolen": stolen,
        "placement": summary.placement["mode"],
        "stages": [
            {
                k: s[k]
                for k in (
                    "stage",
                    "busy_s",
                    "work_s",
                    "busy_fraction",
                    "images_per_s_busy",
                    "sent_bytes_per_image",
                )
            }
            for s in summary.stage_stats
        ],
        "rebalance": summary.rebalance,
        "lanes": lanes,
        # CPU time of the threads computing the model (one torch thread each), all stages.
        "model_cpu_s": sum(s["work_s"] for s in summary.stage_stats),
    }
    print(
        f"{name:>9}: {summary.images_per_second:6.2f} images/s ({summary.seconds:.1f} s timed, "
        f"{call:.1f} s the whole call, {workers} worker(s)"
        + ("" if stolen is None else f", {100 * stolen:.1f}% of the CPU stolen")
        + f"; model threads' CPU time {row['model_cpu_s']:.2f} s"
        + "".join(
            f"; stage {st['stage']} passed {st['sent_bytes_per_image'] / 1e3:.0f} kB/image"
            for st in row["stages"]
            if st["sent_bytes_per_image"]
        )
        + ")",
        flush=True,
    )
    if lanes:
        print(lanes_line(lanes), flush=True)
    return row


def _int8_boundaries(join: bool) -> None:
    """On a worker: build int8 stages with uint8 (``True``) or fp32 (``False``) boundaries from now on."""
    import dask_infer.workflows.kept as kept
    import dask_infer.workflows.stages as stages
    from dask_infer.partition.compress import apply

    if getattr(stages, "_benchmark_join", True) == join:
        return
    stages.compress_stages = functools.partial(apply.compress_stages, int8_boundaries=join)
    stages._benchmark_join = join  # type: ignore[attr-defined]
    kept._kept = None  # stages kept from the other kind of run would be taken as they are


def _variants(args: argparse.Namespace) -> tuple[str, ...]:
    """The pipeline runs each round beside the default one."""
    return (
        *(("planned",) if args.planned_share else ()),
        *(("fp32-boundary",) if args.fp32_boundary else ()),
    )


def _by_turns(every: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """Each round's pipeline/data and pipeline/whole ratio, and their medians; and the median of
    where the pipeline's and data-parallel's model threads spent their runs (see ``_common.model_lanes``)."""
    rounds = [{row["run"]: row for row in every if row["round"] == r} for r in range(1, repeats + 1)]
    over_data = [t["pipeline"]["images_per_s"] / t["data"]["images_per_s"] for t in rounds]
    over_whole = [t["pipeline"]["images_per_s"] / t["whole"]["images_per_s"] for t in rounds]
    result: dict[str, Any] = {
        "pipeline_over_data_rounds": over_data,
        "pipeline_over_whole_rounds": over_whole,
        "pipeline_over_data_median": float(np.median(over_data)),
        "pipeline_over_whole_median": float(np.median(over_whole)),
        "pipeline_over_data_first_round": over_data[0],
    }
    cpu = [t["pipeline"]["model_cpu_s"] / t["data"]["model_cpu_s"] for t in rounds]
    result["model_cpu_pipeline_over_data_rounds"] = cpu
    result["model_cpu_pipeline_over_data_median"] = float(np.median(cpu))
    for variant in ("planned", "fp32-boundary"):
        if all(variant in t for t in rounds):
            key = variant.replace("-", "_")
            ratio = [t[variant]["images_per_s"] / t["data"]["images_per_s"] for t in rounds]
            result[f"{key}_over_data_rounds"] = ratio
            result[f"{key}_over_data_median"] = float(np.median(ratio))
            own = [t["pipeline"]["images_per_s"] / t[variant]["images_per_s"] for t in rounds]
            result[f"pipeline_over_{key}_rounds"] = own
            result[f"pipeline_over_{key}_median"] = float(np.median(own))
    if all(t[name]["lanes"] for t in rounds for name in ("pipeline", "data")):
        steady = [
            t["pipeline"]["lanes"]["steady_images_per_s"] / t["data"]["lanes"]["steady_images_per_s"]
            for t in rounds
        ]
        result["steady_pipeline_over_data_rounds"] = steady
        result["steady_pipeline_over_data_median"] = float(np.median(steady))
        for name in ("pipeline", "data"):
            result[f"{name}_shares_median"] = {
                part: float(np.median([t[name]["lanes"][f"{part}_share"] for t in rounds]))
                for part in ("compute", "fill", "waits", "drain")
            }
    return result


def _round(
    round_: int,
    one: Client,
    two: Client,
    images: str,
    work: Path,
    weights: str,
    args: argparse.Namespace,
    reference: np.ndarray,
    bound: Tolerance,
    checked: int,
    checks: list[Check],
    every: list[dict[str, Any]],
) -> None:
    """One turn of the three runs, their outputs checked (appended to ``checks`` and ``every``)."""
    names = ("whole", "pipeline", "data", *_variants(args))
    every.append(_run("whole", one, images, str(work / "whole.zarr"), weights, args, overwrite=True))
    pipelines = [("pipeline", {"stages": 2, "placement": "pipeline"})]
    if args.planned_share:
        pipelines.append(("planned", {"stages": 2, "placement": "pipeline", "rebalance": False}))
    if args.fp32_boundary:
        pipelines.append(("fp32-boundary", {"stages": 2, "placement": "pipeline"}))
    data = {"placement": "data"}
    # Pipeline and data-parallel change places each round, so neither always runs on
    # workers the other has just warmed.
    for name, kw in [*pipelines, ("data", data)][:: 1 if round_ % 2 else -1]:
        two.run(_int8_boundaries, name != "fp32-boundary")
        every.append(_run(name, two, images, str(work / f"{name}.zarr"), weights, args, overwrite=True, **kw))
    two.run(_int8_boundaries, True)
    for row in every[-len(names) :]:
        row["round"] = round_
    logits = {name: xr.open_zarr(str(work / f"{name}.zarr"))["logits"].values for name in names}
    against_plain = ("whole", *(n for n, _ in pipelines)) if args.compress else ("whole",)
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
        for name in (("data",) if args.compress else (*(n for n, _ in pipelines), "data"))
    ]
    for c in checks[-len(names) :]:
        print(c.line(), flush=True)
    exit_if_failed(checks, "pipeline.py")


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
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of the three runs by turns (the first on fresh workers)",
    )
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
    parser.add_argument(
        "--planned-share",
        action="store_true",
        help="also run the pipeline each round with its planned stages and share, never rebalanced "
        "(a pipeline of compiled stages shares its boundary stage, and the run routes it by measured times)",
    )
    parser.add_argument(
        "--fp32-boundary",
        action="store_true",
        help="with an int8 recipe, also run the pipeline each round with fp32 activations between "
        "its stages instead of uint8",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.fp32_boundary and not (args.compress and CompressionRecipe.parse(args.compress).quantize):
        parser.error(
            f"--fp32-boundary compares int8 boundaries, and --compress is {args.compress!r}; add int8"
        )
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
        names = ("whole", "pipeline", "data", *_variants(args))
        with contextlib.ExitStack() as stack:
            one = stack.enter_context(Client(stack.enter_context(_cluster(1))))
            two = stack.enter_context(Client(stack.enter_context(_cluster(2))))
            for round_ in range(1, args.repeats + 1):
                _round(
                    round_, one, two, images, work, weights, args, reference, bound, checked, checks, every
                )
        runs = [
            max((r for r in every if r["run"] == name), key=lambda r: r["images_per_s"]) for name in names
        ]
        speed = {r["run"]: r["images_per_s"] for r in runs}
        ratios = {
            "pipeline_over_whole": speed["pipeline"] / speed["whole"],
            "pipeline_over_data": speed["pipeline"] / speed["data"],
            "data_over_whole": speed["data"] / speed["whole"],
        }
        turns = _by_turns(every, args.repeats)
        print(
            f"pipeline / whole: {ratios['pipeline_over_whole']:.2f}x   "
            f"pipeline / data-parallel: {ratios['pipeline_over_data']:.2f}x   "
            f"data-parallel / whole: {ratios['data_over_whole']:.2f}x   "
            f"(best of {args.repeats}; logits checked, see above)"
        )
        print(
            f"by turns: pipeline / data-parallel {turns['pipeline_over_data_median']:.2f}x (median of "
            + ", ".join(f"{r:.2f}" for r in turns["pipeline_over_data_rounds"])
            + f"), pipeline / whole {turns['pipeline_over_whole_median']:.2f}x"
        )
        print(
            "model threads' CPU time, pipeline / data-parallel: "
            f"{turns['model_cpu_pipeline_over_data_median']:.2f}x (median of "
            + ", ".join(f"{r:.2f}" for r in turns["model_cpu_pipeline_over_data_rounds"])
            + "): the work the split model adds, apart from the wall time it waits"
        )
        for key, label in (("planned", "planned (never rebalanced)"), ("fp32_boundary", "fp32 boundary")):
            if f"{key}_over_data_median" in turns:
                print(
                    f"by turns: {label} / data-parallel {turns[f'{key}_over_data_median']:.2f}x (median of "
                    + ", ".join(f"{r:.2f}" for r in turns[f"{key}_over_data_rounds"])
                    + f"); pipeline / {label} {turns[f'pipeline_over_{key}_median']:.2f}x (median of "
                    + ", ".join(f"{r:.2f}" for r in turns[f"pipeline_over_{key}_rounds"])
                    + ")"
                )
        if "steady_pipeline_over_data_median" in turns:
            for name in ("pipeline", "data"):
                shares = turns[f"{name}_shares_median"]
                print(
                    f"  {name} model threads (median share of the model span): "
                    + ", ".join(f"{part} {100 * v:.1f}%" for part, v in shares.items())
                )
            print(
                "  without fill and drain: pipeline / data-parallel "
                f"{turns['steady_pipeline_over_data_median']:.2f}x (median of "
                + ", ".join(f"{r:.2f}" for r in turns["steady_pipeline_over_data_rounds"])
                + ")"
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
            "all_runs": [
                {
                    k: r[k]
                    for k in (
                        "run",
                        "round",
                        "images_per_s",
                        "seconds",
                        "call_s",
                        "cpu_stolen",
                        "model_cpu_s",
                        "rebalance",
                        "lanes",
                    )
                }
                for r in every
            ],
            "ratios": ratios,
            "by_turns": turns,
        }
        print(json.dumps(result, indent=2, default=str))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
