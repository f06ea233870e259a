"""Keep the GPU fed: model alone, Zarr decode alone, a plain loop, and dask-infer end to end.

One command, one run, one JSON file. On a GPU: ResNet-50, bf16, channels_last, 224x224
RGB uint8 from zstd Zarr in chunks of 512. It also runs on a CPU (small, fp32, no
compile) so it can be checked anywhere.

Outputs are checked, and a mismatch exits with status 1 and one ``OUTPUT CHECK FAILED``
line after the JSON is written: dask-infer's logits (every round, every image) against
the plain loop's, the compiled model against the eager one on the same batch, and the
plain loop's first batch against an fp32 forward of the same weights. A decode run that
reads the wrong number of images stops the script at once, with the same line.
Tolerance (``TOLERANCES``, max relative error ``max|got - ref| / max|ref|`` and top-1
agreement): fp32 paths 1e-4; bf16 paths 5e-2 and 98% agreement.

    python benchmarks/gpu_throughput.py --json out.json                 # GPU defaults
    python benchmarks/gpu_throughput.py --images 128 --chunk 32 --json out.json   # small, CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from _common import Check, Tolerance, compare_logits, exit_if_failed, machine_info, machine_line
from distributed import Client, LocalCluster

import dask_infer
from dask_infer.io import write_image_dataset
from dask_infer.io.samples import photo_crops
from dask_infer.models import Preprocess, build_model
from dask_infer.workflows.cluster import make_client
from dask_infer.workflows.fold import FOLD_ENV
from dask_infer.workflows.runtime import SWITCH_INTERVAL_ENV, gpu_switch_interval
from dask_infer.workflows.streams import GPU_STREAMS_ENV

TOLERANCES = {
    # Same fp32 arithmetic, other kernels (compiled, batched differently, another process).
    torch.float32: Tolerance(max_rel_err=1e-4),
    # bf16 keeps 8 significant bits; compiled and eager bf16 round at different places. A
    # random model's logits are near ties, so bf16 rounding flips a few top-1 classes against
    # fp32 (96.9% agreement seen on an H100); the trained model of the GPU tests must agree
    # on 99.5%.
    torch.bfloat16: Tolerance(max_rel_err=5e-2, min_agreement=0.95),
}


def card() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU only ({platform.machine()}, {os.cpu_count()} cores)"


def make_dataset(path: str, images: int, size: int, chunk: int, codec: str) -> None:
    """Real photo crops (so zstd sees real image statistics), tiled to ``images``."""
    try:
        base, _ = photo_crops(size, min(images, 256))
    except ImportError:  # no scikit-learn: smooth gradients with noise, compressible like photos
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 200, size, dtype=np.float32)
        base = (
            ramp[None, :, None, None]
            + ramp[None, None, :, None] * 0.25
            + rng.normal(0, 8, (64, size, size, 3))
        )
        base = base.clip(0, 255).astype(np.uint8)
    data = np.concatenate([base] * (-(-images // len(base))))[:images]
    if codec == "none":
        group = zarr.open_group(path, mode="w")
        arr = group.create_array(
            "images", shape=data.shape, chunks=(chunk, size, size, 3), dtype="uint8", compressors=None
        )
        arr[:] = data
    else:
        write_image_dataset(path, data, chunk=chunk)


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Best images/s over ``repeats`` calls of ``fn`` (which returns images processed)."""
    rates = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        n = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return max(rates)


def model_alone(
    model: torch.nn.Module,
    prep: Preprocess,
    device: torch.device,
    batch: int,
    size: int,
    steps: int,
    dtype: torch.dtype,
    channels_last: bool,
) -> Callable[[], int]:
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)

    def go() -> int:
        with torch.inference_mode():
            for _ in range(steps):
                y = prep(x).to(dtype)
                if channels_last:
                    y = y.contiguous(memory_format=torch.channels_last)
                model(y)
        return steps * batch

    return go


def forward(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    prep: Preprocess,
    images: torch.Tensor,
    dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    """Logits (float32, on the CPU) of one batch of uint8 images, as the timed paths compute them."""
    with torch.inference_mode():
        y = prep(images).to(dtype)
        if channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return model(y).float().cpu()


def decode_only(path: str, threads: int) -> Callable[[], int]:
    arr = zarr.open_group(path, mode="r")["images"]
    starts = range(0, arr.shape[0], arr.chunks[0])

    def go() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(b.shape[0] for b in pool.map(lambda s: arr[s : s + arr.chunks[0]], starts))

    return go


def _decode_share(path: str, threads: int, part: int, parts: int) -> int:
    """Images in every ``parts``-th chunk of ``path`` from chunk ``part`` on, read by ``threads`` threads."""
    arr = zarr.open_group(path, mode="r")["images"]
    starts = range(part * arr.chunks[0], arr.shape[0], parts * arr.chunks[0])
    with ThreadPoolExecutor(threads) as pool:
        return sum(b.shape[0] for b in pool.map(lambda s: arr[s : s + arr.chunks[0]], starts))


def decode_processes(path: str, threads: int, processes: int) -> Callable[[], int]:
    """Decode alone in ``processes`` processes of ``threads // processes`` threads, each its share of chunks.

    The processes start before timing; each timed call hands them one read of the store.
    """
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(abs, range(processes)))  # start them
    per = max(1, threads // processes)

    def go() -> int:
        shares = [pool.submit(_decode_share, path, per, i, processes) for i in range(processes)]
        return sum(f.result() for f in shares)

    go.pool = pool  # type: ignore[attr-defined]
    return go


def plain_loop(
    path: str,
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    prep: Preprocess,
    device: torch.device,
    batch: int,
    dtype: torch.dtype,
    channels_last: bool,
    logits: np.ndarray,
    threads: int,
) -> Callable[[], int]:
    """What a careful user writes: reader threads decode chunks ahead, the main thread infers.

    ``threads`` readers keep ``threads + 2`` chunks in flight; each chunk is pinned and
    uploaded without blocking. Each call writes its logits into ``logits`` (one row per
    image), to be checked.
    """
    arr = zarr.open_group(path, mode="r")["images"]
    step = arr.chunks[0]

    def go() -> int:
        starts = iter(range(0, arr.shape[0], step))
        done = 0
        with ThreadPoolExecutor(threads) as pool, torch.inference_mode():
            ahead = deque(
                pool.submit(arr.__getitem__, slice(s, s + step)) for s in islice(starts, threads + 2)
            )
            while ahead:
                block = ahead.popleft().result()
                nxt = next(starts, None)
                if nxt is not None:
                    ahead.append(pool.submit(arr.__getitem__, slice(nxt, nxt + step)))
                host = torch.from_numpy(block)
                if device.type == "cuda":
                    host = host.pin_memory()
                outs = []
                for i in range(0, len(host), batch):
                    y = prep(host[i : i + batch].to(device, non_blocking=True)).to(dtype)
                    if channels_last:
                        y = y.contiguous(memory_format=torch.channels_last)
                    outs.append(model(y).float())
                logits[done : done + len(host)] = torch.cat(outs).cpu().numpy()
                done += len(host)
        return done

    return go


def task_breakdown(client: Client, since: float, wall: float, images: int) -> dict[str, Any]:
    """Per task group of a run (from the scheduler's task stream): tasks, compute seconds, span.

    ``model_busy`` is the model tasks' compute seconds over the run's wall time: near 1
    means the model never waited for data. ``steady_images_per_s`` counts the ``images``
    over the model tasks' span only (first start to last stop), leaving out the fill
    before the first chunk is decoded and the last chunk's write.
    """
    groups: dict[str, dict[str, float]] = {}
    for task in client.get_task_stream(start=since):
        key = task["key"] if isinstance(task["key"], str) else str(task["key"][0])
        group = key.split("-")[0]
        for ss in task.get("startstops", ()):
            if ss.get("action") != "compute":
                continue
            g = groups.setdefault(
                group, {"tasks": 0, "compute_s": 0.0, "first_start": ss["start"], "last_stop": 0.0}
            )
            g["tasks"] += 1
            g["compute_s"] += ss["stop"] - ss["start"]
            g["first_start"] = min(g["first_start"], ss["start"])
            g["last_stop"] = max(g["last_stop"], ss["stop"])
    t0 = min((g["first_start"] for g in groups.values()), default=since)
    out: dict[str, Any] = {}
    for name, g in sorted(groups.items()):
        out[name] = {
            "tasks": int(g["tasks"]),
            "compute_s": round(g["compute_s"], 3),
            "mean_ms": round(1e3 * g["compute_s"] / max(g["tasks"], 1), 2),
            "first_start_s": round(g["first_start"] - t0, 3),
            "last_stop_s": round(g["last_stop"] - t0, 3),
        }
    model = [g for name, g in groups.items() if name.startswith(("infer_", "s0_", "s1_"))]
    if model and wall > 0:
        out["model_busy"] = round(sum(g["compute_s"] for g in model) / wall, 3)
        span = max(g["last_stop"] for g in model) - min(g["first_start"] for g in model)
        if span > 0:
            out["steady_images_per_s"] = round(images / span, 1)
    return out


def dask_infer_runs(
    client: Client,
    source: str,
    work: Path,
    label: str,
    reference: np.ndarray,
    tolerance: Tolerance,
    checks: list[Check],
    repeats: int,
    **options: Any,
) -> dict[str, Any]:
    """``repeats`` dask-infer runs of ``source`` on ``client``'s cluster, each checked against ``reference``.

    The first run loads (and compiles) the model on the workers; every run's throughput
    counts only the chunks' time, as :class:`RunSummary` does.
    """
    rates, breakdown, summary = [], {}, None
    for r in range(repeats):
        out = str(work / f"out-{label}-{r}.zarr")
        client.get_task_stream(start=time.time())  # makes the scheduler record the stream
        since = time.time()
        summary = dask_infer.run(source, out, client=client, progress=False, echo=None, **options)
        rates.append(summary.images_per_second)
        breakdown = task_breakdown(client, since, summary.seconds, summary.images)
        checks.append(
            compare_logits(
                f"dask-infer {label}, round {r + 1}",
                zarr.open_group(out, mode="r")["logits"][:],
                reference,
                tolerance,
                reference="plain loop",
            )
        )
        shutil.rmtree(out, ignore_errors=True)
    assert summary is not None
    return {
        "images_per_s": max(rates),
        "rounds_images_per_s": rates,
        "cluster": summary.cluster,
        "placement": summary.placement,
        "gpus": summary.gpus,
        "tasks_last_round": breakdown,
        "options": {k: v for k, v in options.items() if isinstance(v, str | int | float)},
    }


class Budget:
    """Seconds left for the optional measurements, so the script ends inside its device lease."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, what: str, needs: float) -> bool:
        if time.monotonic() + needs <= self.end:
            return True
        self.skipped.append(what)
        print(f"skipped (time budget): {what}", flush=True)
        return False


def on_new_cluster(
    threads: int,
    environ: dict[str, str],
    sources: list[tuple[str, str, np.ndarray, int]],
    work: Path,
    tolerance: Tolerance,
    checks: list[Check],
    n_workers: int | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Checked dask-infer runs on a new local cluster (``threads`` per worker, ``environ`` set).

    ``sources`` holds (store, label, reference logits, rounds) for each store, run in turn.
    ``n_workers`` above the GPUs starts dask-infer's cluster of workers sharing them.
    """
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)
    try:
        client, choice = make_client(threads_per_worker=threads, n_workers=n_workers)
        if choice is not None:
            print(f"cluster: {choice.describe()}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        return [
            dask_infer_runs(client, source, work, label, reference, tolerance, checks, rounds, **options)
            for source, label, reference, rounds in sources
        ]
    finally:
        close(client)


def close(client: Client) -> None:
    """Close ``client`` and the local cluster it started, so no idle worker holds the GPU."""
    cluster = client.cluster
    client.close()
    if cluster is not None:
        cluster.close()


def two_stages_one_device(
    source: str,
    work: Path,
    recipe: str,
    reference: np.ndarray,
    tolerance: Tolerance,
    checks: list[Check],
    threads: int,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The model cut in two stages, one per worker, both workers on the one GPU (or CPU).

    LocalCUDACluster runs one worker per GPU, so this starts a LocalCluster of two workers,
    which both see the machine's first GPU; no re-cut, so each stage compiles once.
    """
    with (
        LocalCluster(n_workers=2, threads_per_worker=max(1, threads // 2), host="127.0.0.1") as cluster,
        Client(cluster) as client,
    ):
        return dask_infer_runs(
            client,
            source,
            work,
            f"2 stages on 1 device ({recipe})",
            reference,
            tolerance,
            checks,
            1,
            compress=recipe,
            stages=2,
            placement="pipeline",
            rebalance=False,
            **options,
        )


def fp8_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy whose ``nn.Linear`` layers run in fp8 (torchao), or ``None`` where torchao is missing."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
    except ImportError:
        return None
    fp8 = copy.deepcopy(model)
    quantize_(fp8, Float8DynamicActivationFloat8WeightConfig())
    return fp8


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=32768 if gpu else 128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--chunk", type=int, default=512 if gpu else 32)
    parser.add_argument("--batch", type=int, default=256 if gpu else 32)
    parser.add_argument("--threads", type=int, default=16 if gpu else 2, help="decode threads")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=gpu)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds from the script's start (the core measurements included: about 120 s for "
        "ResNet-50 on an H100) after which optional measurements are skipped",
    )
    parser.add_argument(
        "--model-extras",
        action=argparse.BooleanOptionalAction,
        default=gpu,
        help="also time eager batch sizes 128-1024, CUDA graphs and compiled batch 512 for the model alone",
    )
    parser.add_argument(
        "--diagnostics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run dask-infer with Python's 5 ms GIL switch, half the reading threads and "
        "preprocessing compiled on the GPU",
    )
    parser.add_argument(
        "--variants",
        default="cudagraphs,streams,plain-cudagraphs,pipeline,fp8",
        help="comma-separated optional measurements: cudagraphs, streams, plain-cudagraphs, pipeline, fp8, "
        "processes",
    )
    parser.add_argument("--streams", default="2", help="comma-separated CUDA stream counts for 'streams'")
    parser.add_argument(
        "--processes",
        default="2",
        help="comma-separated worker process counts sharing the GPU, for 'processes'",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}

    budget = Budget(args.budget_s)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    recipe = "bf16+channels_last" if gpu else "fp32"
    if args.compile:
        recipe += "+compile"
    work = Path(tempfile.mkdtemp(prefix="dask-infer-gpu-bench-"))
    tolerance = TOLERANCES[dtype]
    checks: list[Check] = []
    machine = machine_info()
    print(machine_line(machine), flush=True)
    result: dict[str, Any] = {
        "card": card(),
        "host": machine,
        "torch": torch.__version__,
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "chunk": args.chunk,
        "batch": args.batch,
        "decode_threads": args.threads,
        "gil_switch_interval_s": gpu_switch_interval(),
        "dtype": str(dtype),
        "recipe": recipe,
    }
    client = None

    def save() -> None:
        """Write what is measured so far, so a run cut off by its time limit still leaves figures."""
        if args.json:
            args.json.write_text(json.dumps({**result, "partial": True}, indent=2, default=str))

    def allows(what: str, needs: float) -> bool:
        save()
        return budget.allows(what, needs)

    try:
        loaded = build_model(args.model)
        weights = str(work / "weights.pt")
        torch.save(loaded.module.state_dict(), weights)
        prep = Preprocess(loaded.input_size, loaded.mean, loaded.std).to(device)
        fp32_model = copy.deepcopy(loaded.module).to(device)  # the reference: plain fp32, eager
        model = loaded.module.to(device).to(dtype)
        channels_last = gpu
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        size = loaded.input_size
        steps = max(4, args.images // args.batch // 8)

        def alone(m: Any, batch: int = args.batch) -> float:
            go = model_alone(
                m, prep, device, batch, size, max(4, steps * args.batch // batch), dtype, channels_last
            )
            go()
            go()
            return timed(go, args.repeats)

        def probe_check(what: str, m: Any, batch: int = args.batch) -> None:
            probe = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).to(device)
            checks.append(
                compare_logits(
                    what,
                    forward(m, prep, probe, dtype, channels_last),
                    forward(model, prep, probe, dtype, channels_last),
                    tolerance,
                    reference="eager model alone",
                )
            )

        result["model_alone_eager_images_per_s"] = alone(model)
        sweep: dict[str, float] = {}
        for batch in (128, 512, 1024) if args.model_extras else ():
            sweep[str(batch)] = alone(model, batch)
        sweep[str(args.batch)] = result["model_alone_eager_images_per_s"]
        result["batch_sweep_eager_images_per_s"] = dict(sorted(sweep.items(), key=lambda kv: int(kv[0])))
        save()
        compiled_model: Any = model
        if args.compile:
            start = time.perf_counter()
            compiled_model = torch.compile(model)
            result["model_alone_compiled_images_per_s"] = alone(compiled_model)
            result["compile_s"] = time.perf_counter() - start
            save()
            probe_check("compiled model alone", compiled_model)
            if gpu and args.model_extras and allows("model alone, CUDA graphs", 90):
                graphs = torch.compile(model, mode="reduce-overhead")
                result["model_alone_cudagraphs_images_per_s"] = alone(graphs)
                save()
                probe_check("CUDA-graph model alone", graphs)
                del graphs
        for codec in ("zstd", "none"):
            path = str(work / f"images-{codec}.zarr")
            start = time.perf_counter()
            make_dataset(path, args.images, args.size, args.chunk, codec)
            print(f"dataset {codec}: {time.perf_counter() - start:.1f} s", flush=True)
            decode = decode_only(path, args.threads)
            decoded = decode()
            if decoded != args.images:
                raise SystemExit(
                    f"OUTPUT CHECK FAILED (gpu_throughput.py): decode ({codec}) read {decoded} images "
                    f"of {args.images}"
                )
            result[f"decode_only_{codec}_images_per_s"] = timed(decode, args.repeats)
            save()
        zstd, plain = str(work / "images-zstd.zarr"), str(work / "images-none.zarr")
        plain_logits = np.full((args.images, loaded.num_classes), np.nan, dtype=np.float32)
        loop = plain_loop(
            zstd, compiled_model, prep, device, args.batch, dtype, channels_last, plain_logits, args.threads
        )
        result["plain_loop_images_per_s"] = timed(loop, args.repeats)
        none_logits = np.full_like(plain_logits, np.nan)
        loop_none = plain_loop(
            plain, compiled_model, prep, device, args.batch, dtype, channels_last, none_logits, args.threads
        )
        result["plain_loop_uncompressed_images_per_s"] = timed(loop_none, args.repeats)
        result["plain_loop_recipe"] = recipe
        save()
        first = torch.from_numpy(np.asarray(zarr.open_group(zstd, mode="r")["images"][: args.batch]))
        checks.append(
            compare_logits(
                f"plain loop ({recipe}), first {len(first)} images",
                plain_logits[: len(first)],
                forward(fp32_model, prep, first.to(device), torch.float32, False),
                tolerance,
                reference="plain fp32 forward",
            )
        )
        client, _ = make_client(threads_per_worker=args.threads)
        options = {
            "model": args.model,
            "weights": weights,
            "batch_size": args.batch,
            "chunk_size": args.chunk,
        }
        runs: dict[str, Any] = {}
        result["dask_infer"] = runs
        runs["zstd"] = dask_infer_runs(
            client,
            zstd,
            work,
            recipe,
            plain_logits,
            tolerance,
            checks,
            args.repeats,
            compress=recipe,
            **options,
        )
        runs["uncompressed"] = dask_infer_runs(
            client,
            plain,
            work,
            f"{recipe} uncompressed",
            none_logits,
            tolerance,
            checks,
            1,
            compress=recipe,
            **options,
        )
        graphs_recipe = recipe.replace("+compile", "+cudagraphs")
        if gpu and args.compile and "cudagraphs" in variants and allows("dask-infer with CUDA graphs", 90):
            runs["zstd_cudagraphs"] = dask_infer_runs(
                client,
                zstd,
                work,
                graphs_recipe,
                plain_logits,
                tolerance,
                checks,
                args.repeats,
                compress=graphs_recipe,
                **options,
            )
            runs["uncompressed_cudagraphs"] = dask_infer_runs(
                client,
                plain,
                work,
                f"{graphs_recipe} uncompressed",
                none_logits,
                tolerance,
                checks,
                1,
                compress=graphs_recipe,
                **options,
            )
        close(client)
        client = None
        for n in (int(c) for c in args.streams.split(",") if c.strip()) if "streams" in variants else ():
            if gpu and allows(f"dask-infer with {n} CUDA streams", 60):
                runs[f"zstd_{n}_streams"], runs[f"uncompressed_{n}_streams"] = on_new_cluster(
                    args.threads,
                    {GPU_STREAMS_ENV: str(n)},
                    [
                        (zstd, f"{recipe}, {n} streams", plain_logits, args.repeats),
                        (plain, f"{recipe} uncompressed, {n} streams", none_logits, 1),
                    ],
                    work,
                    tolerance,
                    checks,
                    compress=recipe,
                    **options,
                )
        for n in (int(c) for c in args.processes.split(",") if c.strip()) if "processes" in variants else ():
            if not allows(f"decode alone and dask-infer on {n} processes sharing the device", 90):
                continue
            for key, store in (("none", plain), ("zstd", zstd)):
                decode = decode_processes(store, args.threads, n)
                try:
                    result[f"decode_only_{key}_{n}_processes_images_per_s"] = timed(decode, args.repeats)
                finally:
                    decode.pool.shutdown()  # type: ignore[attr-defined]
            # dask-infer's own cluster for more workers than GPUs: n processes, the threads shared out.
            runs[f"zstd_{n}_processes"], runs[f"uncompressed_{n}_processes"] = on_new_cluster(
                max(1, args.threads // n),
                {},
                [
                    (zstd, f"{recipe}, {n} processes on 1 device", plain_logits, args.repeats),
                    (plain, f"{recipe} uncompressed, {n} processes on 1 device", none_logits, 1),
                ],
                work,
                tolerance,
                checks,
                n_workers=n,
                compress=recipe,
                **options,
            )
        if (
            gpu
            and args.compile
            and "zstd_cudagraphs" in runs
            and "plain-cudagraphs" in variants
            and allows("plain loop with CUDA graphs", 40)
        ):
            # Like with like for dask-infer's CUDA-graph runs: the same recipe in the plain loop.
            graphs_model = torch.compile(model, mode="reduce-overhead")
            for key, store, logits in (
                ("plain_loop_cudagraphs_images_per_s", zstd, plain_logits),
                ("plain_loop_cudagraphs_uncompressed_images_per_s", plain, none_logits),
            ):
                result[key] = timed(
                    plain_loop(
                        store,
                        graphs_model,
                        prep,
                        device,
                        args.batch,
                        dtype,
                        channels_last,
                        logits,
                        args.threads,
                    ),
                    args.repeats,
                )
            del graphs_model
        if "pipeline" in variants and allows("two stages sharing the GPU", 120):
            result["pipeline_two_stages_one_gpu"] = two_stages_one_device(
                zstd, work, recipe, plain_logits, tolerance, checks, args.threads, options
            )
        if (
            gpu
            and args.compile
            and "fp8" in variants
            and allows("model alone, fp8 linear layers (torchao)", 60)
        ):
            fp8 = fp8_model(model)
            if fp8 is None:
                result["fp8"] = "torchao is not installed"
            else:
                fp8_compiled = torch.compile(fp8)
                result["model_alone_fp8_linear_compiled_images_per_s"] = alone(fp8_compiled)
                probe_check("fp8 (linear layers) compiled model alone", fp8_compiled)
        diagnostics: list[tuple[str, str, int, dict[str, str], str, str, np.ndarray]] = [
            # (run, what it tests, reading threads, workers' environment, store, label, reference)
            (
                "uncompressed_preprocess_compiled",
                "dask-infer with preprocessing compiled",
                args.threads,
                {FOLD_ENV: "1"},
                plain,
                f"{recipe} uncompressed, preprocessing compiled with stage 0's input conversion",
                none_logits,
            ),
            (
                "zstd_switch_5ms",
                "dask-infer with Python's default GIL switch interval",
                args.threads,
                {SWITCH_INTERVAL_ENV: "0.005"},
                zstd,
                f"{recipe}, GIL switch 5 ms",
                plain_logits,
            ),
            (
                f"zstd_{max(1, args.threads // 2)}_threads",
                f"dask-infer with {max(1, args.threads // 2)} reading threads",
                max(1, args.threads // 2),
                {},
                zstd,
                f"{recipe}, {max(1, args.threads // 2)} threads",
                plain_logits,
            ),
        ]
        for key, what, threads, environ, source, label, reference in diagnostics if args.diagnostics else ():
            if (gpu and args.compile or FOLD_ENV not in environ) and allows(what, 60):
                (runs[key],) = on_new_cluster(
                    threads,
                    environ,
                    [(source, label, reference, 1)],
                    work,
                    tolerance,
                    checks,
                    compress=recipe,
                    **options,
                )
        # Last, as the least likely to change the recipe: a bigger compiled batch.
        if args.model_extras and args.compile and allows("model alone, compiled batch 512", 60):
            result["model_alone_compiled_batch512_images_per_s"] = alone(torch.compile(model), 512)
        best = max(r["images_per_s"] for k, r in runs.items() if k.startswith("zstd"))
        alone_best = max(
            float(v) for k, v in result.items() if k.startswith("model_alone_") and k.endswith("images_per_s")
        )
        result["dask_infer_images_per_s"] = best
        result["ratio_end_to_end_vs_model_alone"] = best / alone_best
        result["ratio_end_to_end_vs_decode_alone"] = best / float(result["decode_only_zstd_images_per_s"])
        result["ratio_vs_plain_loop"] = runs["zstd"]["images_per_s"] / float(
            result["plain_loop_images_per_s"]
        )
        result["ratio_uncompressed_vs_plain_loop"] = runs["uncompressed"]["images_per_s"] / float(
            result["plain_loop_uncompressed_images_per_s"]
        )
        result["ratio_uncompressed_vs_decode_alone"] = runs["uncompressed"]["images_per_s"] / float(
            result["decode_only_none_images_per_s"]
        )
        for key in runs:
            plain_key = {
                "zstd_cudagraphs": "plain_loop_cudagraphs_images_per_s",
                "uncompressed_cudagraphs": "plain_loop_cudagraphs_uncompressed_images_per_s",
            }.get(
                key,
                "plain_loop_images_per_s"
                if key.startswith("zstd_")
                else "plain_loop_uncompressed_images_per_s",
            )
            if (
                key not in ("zstd", "uncompressed") and plain_key in result
            ):  # against the plain loop of its recipe
                result[f"ratio_{key}_vs_plain_loop"] = runs[key]["images_per_s"] / float(result[plain_key])
            if key.startswith("uncompressed_"):
                result[f"ratio_{key}_vs_decode_alone"] = runs[key]["images_per_s"] / float(
                    result["decode_only_none_images_per_s"]
                )
    finally:
        if client is not None:
            close(client)
        shutil.rmtree(work, ignore_errors=True)
    result["skipped"] = budget.skipped
    result["output_tolerance"] = str(tolerance)
    result["output_checks"] = [c.to_dict() for c in checks]
    result["output_checks_ok"] = all(c.ok for c in checks)
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(table(result))
    for c in checks:
        print(c.line())
    exit_if_failed(checks, "gpu_throughput.py")


def table(result: dict[str, Any]) -> str:
    """The figures as a short text table, for the end of the output."""
    rows = [(k, v) for k, v in result.items() if k.endswith("images_per_s") and isinstance(v, float | int)]
    for name, run in result.get("dask_infer", {}).items():
        rows.append((f"dask-infer {name}", run["images_per_s"]))
        busy = run["tasks_last_round"].get("model_busy")
        if busy is not None:
            rows.append((f"model busy share ({name})", busy))
        steady = run["tasks_last_round"].get("steady_images_per_s")
        if steady is not None:
            rows.append((f"  steady state, model tasks' span ({name})", steady))
    if "pipeline_two_stages_one_gpu" in result:
        rows.append(("dask-infer 2 stages on 1 GPU", result["pipeline_two_stages_one_gpu"]["images_per_s"]))
    rows += [(k, v) for k, v in result.items() if k.startswith("ratio_")]
    return "\n".join(f"{k:55s} {v:12,.2f}" for k, v in rows)


if __name__ == "__main__":
    main()
