"""Compressed recipes on the CPU: plain PyTorch loops against dask-infer, in one run, on one Zarr dataset.

For each recipe (``--recipes``, default ``fp32``, ``bf16+channels_last+compile`` and
``int8+compile``) the script times:

* the plain loop a user writes by hand (read a chunk, normalise, forward, write logits to
  Zarr; best of ``--passes``) with the recipe applied by hand: the model cast to the dtype
  and memory format, or quantized by the project's ``quantize_int8``, then
  ``torch.compile`` with and without inductor freezing, and (``plain_folded``) frozen with
  the normalisation compiled into the same graph; each loop runs one batch before its
  timing starts;
* ``dask_infer.run`` with ``--compress`` set to the recipe on a fresh LocalCluster: the
  warm rate (the run summary's seconds, from submission, after the workers built and
  compiled their stages), the cold time from starting the cluster to the first written
  chunk, and the whole call; then a second run on the same cluster, which takes the stages
  the first left on its workers (``again_*`` in the JSON); for compiled recipes also with
  ``DASK_INFER_COMPILE_PREPROCESS=0`` (preprocessing left eager), to show what compiling it
  gives. A loop like the plain one drives dask-infer's own stage (``compress_stages``), built
  in one new thread and run in another, as a worker does. Each dask-infer run also reports
  the model's own figures from the run's per-stage timings: its rate while it ran, its share
  of the wall time and the cores it kept busy, which tell a slow model (threads,
  compilation) from a slow pipeline around it, and how many graphs the workers have compiled
  so far (more than at load means a compilation inside the timed run). All of it runs on the
  CPU, also on a machine with a GPU;
* then ``--rounds`` rounds (default 3) of one pass of the reference plain loop (frozen for
  compiled recipes) and one more dask-infer run on the same cluster, by turns: on a shared
  virtual machine the speed of both drifts by tens of percent within minutes, and a single
  run of each compares two moments as much as two programs. The headline ratios are the
  median of the rounds' ratios and dask-infer's best warm run against the best plain pass
  (both the best of their tries). Each timed figure is printed with the share of the CPU
  the hypervisor stole meanwhile (``/proc/stat``'s ``steal``).

It prints each rate, the ratio of dask-infer to the best plain loop of the same recipe and
to fp32, the CPU model, its flags and the load average (other work may share the
machine). Output checks: every dask-infer run against the plain loop of its recipe with
freezing (fp32: max relative error 1e-5; bf16: 5e-2; int8: 1e-1, the same quantization
applied to the same calibration images, compiled in another process); outside them the
script exits with status 1 and one ``OUTPUT CHECK FAILED`` line. Agreement with fp32 is
printed, not checked (random weights give near-tied top-1 classes).

    python benchmarks/cpu_compressed.py [--model resnet50] [--images 512] [--json out.json]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._inductor.config as inductor_config
import zarr
from _common import (
    StealMeter,
    Tolerance,
    bench_parser,
    compare_logits,
    exit_if_failed,
    machine_info,
    machine_line,
)

import dask_infer
from dask_infer.io import write_sample
from dask_infer.models import build_model
from dask_infer.partition.compress import CompressionRecipe, compress_stages
from dask_infer.partition.compress.quantize import quantize_int8
from dask_infer.workflows.cluster import make_client
from dask_infer.workflows.cores import usable_cores
from dask_infer.workflows.fold import FOLD_ENV

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TOLERANCE = {"fp32": Tolerance(max_rel_err=1e-5), "bf16": Tolerance(max_rel_err=5e-2)}
_INT8_TOLERANCE = Tolerance(max_rel_err=1e-1)
CALIBRATION_IMAGES = 64  # what a dask-infer worker calibrates int8 on by default: the input's first images


def _normalise(block: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW (channels-last strides, as the images arrive)."""
    return (block.permute(0, 3, 1, 2).float().div(255) - mean) / std


def hand_model(
    module: torch.nn.Module,
    recipe: CompressionRecipe,
    calibration: torch.Tensor,
    freeze: bool,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    fold: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The recipe applied by hand; returns forward(uint8 NHWC batch) -> fp32 logits.

    With ``fold`` (compiled recipes), normalising and converting the batch are compiled
    into the same graph as the model; otherwise they run eagerly before it.
    """
    module = copy.deepcopy(module).eval()
    dtype = _DTYPES[recipe.precision]
    if recipe.quantize == "int8":
        module = quantize_int8(module, calibration)
    else:
        module = module.to(dtype)
        if recipe.channels_last:
            module = module.to(memory_format=torch.channels_last)

    def convert(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        elif recipe.quantize == "int8":
            x = x.contiguous()  # the exported int8 graph is specialised to contiguous inputs
        return x

    def whole(raw: torch.Tensor) -> torch.Tensor:
        return module(convert(_normalise(raw, mean, std))).float()

    if not recipe.compile:
        return whole
    if fold:
        compiled_whole = torch.compile(whole)

        def folded(raw: torch.Tensor) -> torch.Tensor:
            with inductor_config.patch(freezing=freeze):
                return compiled_whole(raw)

        return folded
    compiled = torch.compile(module)

    def forward(raw: torch.Tensor) -> torch.Tensor:
        with inductor_config.patch(freezing=freeze):
            return compiled(convert(_normalise(raw, mean, std))).float()

    return forward


def _in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a new thread, as a worker's loading and compute threads run the model; the
    thread's exception is raised here."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def project_stage(
    module: torch.nn.Module,
    text: str,
    calibration: torch.Tensor,
    first: torch.Tensor,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """dask-infer's own stage for recipe ``text`` (``compress_stages``, as a worker builds it),
    built and compiled on ``first`` in one new thread; forward(uint8 NHWC batch) -> fp32 logits,
    normalising eagerly."""

    def build() -> Any:
        (stage,) = compress_stages([copy.deepcopy(module).eval()], text, calibration=calibration)
        stage.pad_batches_to(len(first))
        with torch.inference_mode():
            stage(_normalise(first, mean, std))
        return stage

    stage = _in_thread(build)

    def forward(raw: torch.Tensor) -> torch.Tensor:
        return stage(_normalise(raw, mean, std)).float()

    return forward


def plain_loop(
    images_url: str,
    output_url: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    loaded: Any,
    batch: int,
    passes: int = 2,
) -> float:
    """Read a chunk, forward (normalising) in batches, write; the fastest of ``passes`` passes, in
    seconds, after one warm-up batch."""
    src = zarr.open_group(images_url, mode="r")["images"]
    n, step = src.shape[0], src.chunks[0]
    out = zarr.create_array(
        output_url, shape=(n, loaded.num_classes), chunks=(step, loaded.num_classes), dtype="float32"
    )
    best = float("inf")
    with torch.inference_mode():
        forward(torch.from_numpy(np.asarray(src[:batch])))  # compiles here
        for _ in range(passes):
            start = time.perf_counter()
            for s in range(0, n, step):
                block = torch.from_numpy(np.asarray(src[s : s + step]))
                logits = [forward(block[i : i + batch]) for i in range(0, len(block), batch)]
                out[s : s + len(block)] = torch.cat(logits).numpy()
            best = min(best, time.perf_counter() - start)
    return best


def _first_chunk_watch(output: Path) -> tuple[threading.Event, list[float]]:
    """Poll ``output`` for its first written logits chunk; the time it appears goes in the list."""
    stop, seen = threading.Event(), []

    def poll() -> None:
        chunks = output / "logits" / "c"
        while not stop.is_set():
            if chunks.is_dir() and any(p.is_file() for p in chunks.rglob("*")):
                seen.append(time.perf_counter())
                return
            time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return stop, seen


def _model_time(stage_stats: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """The model's own share of a run, from its per-stage figures: images/s while the stages ran
    (to set against the plain loop's rate), their share of the run's wall time, and the cores
    they kept busy (CPU seconds per wall second: torch's threads at work)."""
    busy = sum(s["busy_s"] for s in stage_stats)
    work = sum(s["work_s"] for s in stage_stats)
    images = max((s["images"] for s in stage_stats), default=0)
    return {
        f"{prefix}model_images_per_s_busy": images / busy if busy else None,
        f"{prefix}model_busy_fraction": max((s["busy_fraction"] for s in stage_stats), default=None),
        f"{prefix}model_cores_busy": work / busy if busy else None,
    }


def _percent(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def _stolen(share: float | None) -> str:
    """``share`` of the CPU stolen by the hypervisor, for a printed line ("" when none was)."""
    return "" if not share else f" ({_percent(share)} of the CPU stolen by the hypervisor)"


def _round_ratios(ours: dict[str, Any], best_plain: float) -> dict[str, Any]:
    """dask-infer against the plain loop from the rounds timed by turns: the median of each round's
    ratio, and dask-infer's best warm run against the best plain pass of all (both best of their
    tries; ``best_plain`` is the best before the rounds)."""
    plain, mine = ours["rounds_plain_images_per_s"], ours["rounds_images_per_s"]
    warm = [ours["images_per_s"], ours["again_images_per_s"], *mine]
    best_of_all = max([best_plain, *plain])
    return {
        "ratio_rounds_median": float(np.median([m / p for m, p in zip(mine, plain, strict=True)]))
        if mine
        else None,
        "dask_infer_best_images_per_s": max(warm),
        "best_plain_all_images_per_s": best_of_all,
        "ratio_best_to_best": max(warm) / best_of_all,
    }


def _most_stolen(row: dict[str, Any]) -> float | None:
    """The largest stolen share of any timed figure in ``row``."""
    shares = [
        share
        for key, value in row.items()
        if key.endswith("cpu_stolen")
        for share in (value if isinstance(value, list) else [value])
    ]
    return max((v for v in shares if v is not None), default=None)


def _worker_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (run on a worker)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _model_line(figures: dict[str, Any]) -> str:
    """One run's model figures (see :func:`_model_time`), for the printed report."""
    if figures.get("model_images_per_s_busy") is None:
        return "no stage figures"
    return (
        f"the model alone {figures['model_images_per_s_busy']:.2f} images/s while it ran, "
        f"{figures['model_busy_fraction']:.0%} of the wall, on {figures['model_cores_busy']:.2f} cores; "
        f"{figures['worker_graphs']} graph(s) compiled in the worker(s) so far"
    )


def dask_infer_run(
    images: str,
    output: Path,
    model: str,
    weights: str,
    batch: int,
    recipe: str,
    *,
    rounds: int = 0,
    plain_pass: Callable[[int], float] | None = None,
) -> dict[str, Any]:
    """``dask_infer.run`` twice on one fresh LocalCluster: the first run's warm rate, its time from
    starting the cluster to the first written chunk and its whole time; then the same for a second
    run on the same cluster, which takes the stages the first left on the workers.

    Then ``rounds`` rounds of one ``plain_pass(round)`` (images/s) and one more run on the same
    cluster, so both sides are timed by turns under the same conditions (``rounds_*``).
    Every timed figure comes with the share of the CPU the hypervisor stole meanwhile.
    """
    options: dict[str, Any] = {
        "model": model,
        "weights": weights,
        "batch_size": batch,
        "compress": None if recipe == "fp32" else recipe,
        "progress": False,
        "echo": None,
        "device": "cpu",
    }
    t0 = time.perf_counter()
    client, choice = make_client(device="cpu")
    figures: dict[str, Any] = {"cluster": choice.describe() if choice else None}
    try:
        for prefix, out in (("", output), ("again_", output.with_name(output.name + ".again"))):
            stop, seen = _first_chunk_watch(out)
            steal = StealMeter()
            summary = dask_infer.run(images, str(out), client=client, **options)
            total = time.perf_counter() - t0
            stop.set()
            figures |= {
                f"{prefix}seconds": summary.seconds,
                f"{prefix}images_per_s": summary.images / summary.seconds,
                f"{prefix}first_chunk_s": seen[0] - t0 if seen else None,
                f"{prefix}call_s": total,
                f"{prefix}reused_loads": summary.reused_loads,
                f"{prefix}cpu_stolen": steal.share(),
                **_model_time(summary.stage_stats, prefix),
                # A count above the stages (and folded preprocessing) compiled at load means the
                # run compiled again mid-way, inside its timed part.
                f"{prefix}worker_graphs": sum(client.run(_worker_graphs).values()),
            }
            t0 = time.perf_counter()
        for key in ("plain_images_per_s", "images_per_s", "plain_cpu_stolen", "cpu_stolen"):
            figures[f"rounds_{key}"] = []
        for k in range(rounds if plain_pass is not None else 0):
            steal = StealMeter()
            figures["rounds_plain_images_per_s"].append(plain_pass(k))
            figures["rounds_plain_cpu_stolen"].append(steal.share())
            steal = StealMeter()
            out = output.with_name(f"{output.name}.round{k}")
            summary = dask_infer.run(images, str(out), client=client, **options)
            figures["rounds_cpu_stolen"].append(steal.share())
            figures["rounds_images_per_s"].append(summary.images / summary.seconds)
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
    return figures


def main() -> None:
    parser = bench_parser(__doc__, model="resnet50", images=512, size=224, chunk=32, batch=32)
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each plain loop (best kept)")
    parser.add_argument("--recipes", default="fp32,bf16+channels_last+compile,int8+compile")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="after the runs above, rounds of one plain pass and one dask-infer run by turns (0: none)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="compiled recipes: only the frozen plain loop, the loop of dask-infer's stage and dask-infer "
        "with compiled preprocessing (three compilations fewer, for a short session on another machine)",
    )
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    info_start = machine_info()
    print(machine_line(info_start), flush=True)

    work = Path(tempfile.mkdtemp(prefix="dask-infer-bench-"))
    rows: list[dict[str, Any]] = []
    checks = []
    try:
        images = str(work / "images.zarr")
        write_sample(images, kind="photos", size=args.size, count=args.images, chunk=args.chunk)
        weights = str(work / "weights.pt")
        torch.manual_seed(0)
        model = build_model(args.model).module
        torch.save(
            {"state_dict": model.state_dict(), "meta": {"model": args.model, "input_size": args.size}},
            weights,
        )
        loaded = build_model(args.model, weights=weights)
        mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaded.std).view(1, 3, 1, 1)
        first = np.asarray(zarr.open_group(images, mode="r")["images"][:CALIBRATION_IMAGES])
        calibration = _normalise(torch.from_numpy(first), mean, std).contiguous()
        torch.set_num_threads(usable_cores())
        fp32_logits = None
        for text in recipes:
            recipe = CompressionRecipe.parse(text)
            row: dict[str, Any] = {"recipe": text}
            if recipe.compile:
                # The worker's stage and threads without the worker: tells a slow stage from a slow worker.
                raw = torch.from_numpy(np.asarray(zarr.open_group(images, mode="r")["images"][: args.batch]))
                forward = project_stage(loaded.module, text, calibration, raw, mean=mean, std=std)
                out = work / f"stage-{text}.zarr"
                seconds = _in_thread(
                    lambda out=out, forward=forward: plain_loop(
                        images, str(out), forward, loaded, args.batch, args.passes
                    )
                )
                row["stage_loop_images_per_s"] = args.images / seconds
                print(
                    f"{text:<32} {'plain loop, dask-infer stage, threads':<14} "
                    f"{row['stage_loop_images_per_s']:8.2f} images/s",
                    flush=True,
                )
                torch._dynamo.reset()
            # The reference (the frozen loop for compiled recipes) runs last and stays compiled:
            # it is timed again by turns with dask-infer's runs.
            variants = [("plain", False, False), ("plain_folded", True, True), ("plain_frozen", True, False)]
            if args.quick:
                variants = variants[-1:]
            for key, freeze, fold in variants if recipe.compile else [("plain", False, False)]:
                torch._dynamo.reset()  # the previous variant's compiled code
                out = work / f"{key}-{text}.zarr"
                forward = hand_model(
                    loaded.module, recipe, calibration, freeze, mean=mean, std=std, fold=fold
                )
                steal = StealMeter()
                seconds = plain_loop(images, str(out), forward, loaded, args.batch, args.passes)
                row[f"{key}_images_per_s"] = args.images / seconds
                rate = row[f"{key}_images_per_s"]
                print(f"{text:<32} {key:<14} {rate:8.2f} images/s{_stolen(steal.share())}", flush=True)
            ref_key = "plain_frozen" if recipe.compile else "plain"
            reference = zarr.open_array(str(work / f"{ref_key}-{text}.zarr"), mode="r")[:]
            if text == "fp32":
                fp32_logits = reference
            if recipe.compile and not args.quick:
                os.environ[FOLD_ENV] = "0"
                try:
                    eager = dask_infer_run(
                        images, work / f"eager-{text}.zarr", args.model, weights, args.batch, text
                    )
                finally:
                    del os.environ[FOLD_ENV]
                row["dask_infer_eager_preprocess_images_per_s"] = eager["images_per_s"]
                print(
                    f"{text:<32} dask-infer, eager preprocessing {eager['images_per_s']:8.2f} images/s; "
                    + _model_line(eager),
                    flush=True,
                )
            ours = dask_infer_run(
                images,
                work / f"ours-{text}.zarr",
                args.model,
                weights,
                args.batch,
                text,
                rounds=args.rounds,
                plain_pass=lambda k, f=forward, name=f"{ref_key}-{text}": (
                    args.images
                    / plain_loop(images, str(work / f"{name}-round{k}.zarr"), f, loaded, args.batch, 1)
                ),
            )
            torch._dynamo.reset()
            row.update({f"dask_infer_{k}": v for k, v in ours.items()})
            best = max(v for k, v in row.items() if k.startswith("plain") and k.endswith("images_per_s"))
            row["best_plain_images_per_s"] = best
            row["ratio_to_best_plain"] = ours["images_per_s"] / best
            row |= _round_ratios(ours, best)
            got = zarr.open_group(str(work / f"ours-{text}.zarr"), mode="r")["logits"][:]
            tolerance = _INT8_TOLERANCE if recipe.quantize else _TOLERANCE.get(recipe.precision, Tolerance())
            check = compare_logits(
                f"dask-infer {text}", got, reference, tolerance, reference=f"plain loop {text}"
            )
            checks.append(check)
            if fp32_logits is not None:
                row["top1_agreement_with_fp32"] = float((got.argmax(1) == fp32_logits.argmax(1)).mean())
            print(
                f"{text:<32} dask-infer     {ours['images_per_s']:8.2f} images/s "
                f"({row['ratio_to_best_plain']:.2f}x best plain loop); first chunk "
                f"{ours['first_chunk_s']:.1f} s after the call, whole call {ours['call_s']:.1f} s; "
                f"a second run on the same cluster: first chunk {ours['again_first_chunk_s']:.1f} s, "
                f"whole call {ours['again_call_s']:.1f} s, {ours['again_images_per_s']:.2f} images/s, "
                f"stages kept on {ours['again_reused_loads']} worker(s); "
                + _model_line(ours)
                + f", {ours['again_worker_graphs']} after the second run"
                + _stolen(ours["cpu_stolen"]),
                flush=True,
            )
            if ours["rounds_images_per_s"]:
                print(
                    f"{text:<32} by turns        plain "
                    + ", ".join(f"{v:.2f}" for v in ours["rounds_plain_images_per_s"])
                    + "; dask-infer "
                    + ", ".join(f"{v:.2f}" for v in ours["rounds_images_per_s"])
                    + f" images/s; median ratio {row['ratio_rounds_median']:.2f}x; best warm run "
                    f"{row['dask_infer_best_images_per_s']:.2f}, {row['ratio_best_to_best']:.2f}x the best "
                    "plain pass; CPU stolen: plain "
                    + ", ".join(_percent(v) for v in ours["rounds_plain_cpu_stolen"])
                    + "; dask-infer "
                    + ", ".join(_percent(v) for v in ours["rounds_cpu_stolen"]),
                    flush=True,
                )
            print(check.line(), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fp32_rate = next((r["dask_infer_images_per_s"] for r in rows if r["recipe"] == "fp32"), None)
    for r in rows:
        if fp32_rate:
            r["dask_infer_vs_fp32"] = r["dask_infer_images_per_s"] / fp32_rate
    result = {
        "machine_info": info_start,
        "load_average_end": os.getloadavg(),
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "batch": args.batch,
        "storage_chunk": args.chunk,
        "plain_loop_passes": args.passes,
        "rows": rows,
        "output_checks": [c.to_dict() for c in checks],
    }
    print(json.dumps(result, indent=2))
    print(machine_line(info_start))
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (
        "| recipe | plain loop | plain loop, frozen | plain loop, frozen + folded | loop of dask-infer's "
        "stage, in threads | dask-infer, eager preprocessing | dask-infer | / best plain | the model "
        "alone in dask-infer | vs fp32 | first chunk s | first chunk s, second run | dask-infer, best warm "
        "run | / best plain, best of each | / plain, by turns (median) | CPU stolen, most |"
    )
    print(header)
    print("|---" * header.count(" | ") + "|---|")
    for r in rows:

        def cell(key: str, fmt: str = "{:.2f}", row: dict[str, Any] = r) -> str:
            value = row.get(key)
            return "-" if value is None else fmt.format(value)

        print(
            f"| `{r['recipe']}` | {cell('plain_images_per_s')} | {cell('plain_frozen_images_per_s')} | "
            f"{cell('plain_folded_images_per_s')} | {cell('stage_loop_images_per_s')} | "
            f"{cell('dask_infer_eager_preprocess_images_per_s')} | "
            f"{cell('dask_infer_images_per_s')} | {cell('ratio_to_best_plain', '{:.2f}x')} | "
            f"{cell('dask_infer_model_images_per_s_busy')} | "
            f"{cell('dask_infer_vs_fp32', '{:.2f}x')} | {cell('dask_infer_first_chunk_s', '{:.1f}')} | "
            f"{cell('dask_infer_again_first_chunk_s', '{:.1f}')} | "
            f"{cell('dask_infer_best_images_per_s')} | {cell('ratio_best_to_best', '{:.2f}x')} | "
            f"{cell('ratio_rounds_median', '{:.2f}x')} | {_percent(_most_stolen(r))} |"
        )
    for c in checks:
        print(c.line())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    exit_if_failed(checks, "cpu_compressed.py")


if __name__ == "__main__":
    main()
