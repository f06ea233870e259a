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
import os
import platform
import queue
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from _common import Check, Tolerance, compare_logits, exit_if_failed, machine_info, machine_line

import dask_infer
from dask_infer.io import write_image_dataset
from dask_infer.io.samples import photo_crops
from dask_infer.models import Preprocess, build_model

TOLERANCES = {
    # Same fp32 arithmetic, other kernels (compiled, batched differently, another process).
    torch.float32: Tolerance(max_rel_err=1e-4),
    # bf16 keeps 8 significant bits; compiled and eager bf16 round at different places.
    torch.bfloat16: Tolerance(max_rel_err=5e-2, min_agreement=0.98),
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


def plain_loop(
    path: str,
    model: torch.nn.Module,
    prep: Preprocess,
    device: torch.device,
    batch: int,
    dtype: torch.dtype,
    channels_last: bool,
    logits: np.ndarray,
) -> Callable[[], int]:
    """What a careful user writes: a prefetch thread reads chunks, the main thread infers.

    Each call writes its logits into ``logits`` (one row per image), to be checked.
    """
    arr = zarr.open_group(path, mode="r")["images"]
    step = arr.chunks[0]

    def go() -> int:
        q: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=4)

        def reader() -> None:
            for s in range(0, arr.shape[0], step):
                q.put(arr[s : s + step])
            q.put(None)

        threading.Thread(target=reader, daemon=True).start()
        done = 0
        with torch.inference_mode():
            while (block := q.get()) is not None:
                host = torch.from_numpy(block)
                if device.type == "cuda":
                    host = host.pin_memory()
                for i in range(0, len(host), batch):
                    y = prep(host[i : i + batch].to(device, non_blocking=True)).to(dtype)
                    if channels_last:
                        y = y.contiguous(memory_format=torch.channels_last)
                    out = model(y).float().cpu().numpy()
                    logits[done + i : done + i + len(out)] = out
                done += len(host)
        return done

    return go


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--images", type=int, default=16384 if gpu else 128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--chunk", type=int, default=512 if gpu else 32)
    parser.add_argument("--batch", type=int, default=256 if gpu else 32)
    parser.add_argument("--threads", type=int, default=16 if gpu else 2, help="decode threads")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=gpu)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

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
    result: dict[str, object] = {
        "card": card(),
        "host": machine,
        "torch": torch.__version__,
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "chunk": args.chunk,
        "batch": args.batch,
        "dtype": str(dtype),
        "recipe": recipe,
    }
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
        steps = max(4, args.images // args.batch // 4)
        eager = model_alone(model, prep, device, args.batch, loaded.input_size, steps, dtype, channels_last)
        eager()
        result["model_alone_eager_images_per_s"] = timed(eager, args.repeats)
        if args.compile:
            compiled_model = torch.compile(model)
            compiled = model_alone(
                compiled_model, prep, device, args.batch, loaded.input_size, steps, dtype, channels_last
            )
            compiled()
            result["model_alone_compiled_images_per_s"] = timed(compiled, args.repeats)
            probe = torch.randint(
                0, 256, (args.batch, loaded.input_size, loaded.input_size, 3), dtype=torch.uint8
            ).to(device)
            checks.append(
                compare_logits(
                    "compiled model alone",
                    forward(compiled_model, prep, probe, dtype, channels_last),
                    forward(model, prep, probe, dtype, channels_last),
                    tolerance,
                    reference="eager model alone",
                )
            )
        for codec in ("zstd", "none"):
            path = str(work / f"images-{codec}.zarr")
            make_dataset(path, args.images, args.size, args.chunk, codec)
            decode = decode_only(path, args.threads)
            decoded = decode()
            if decoded != args.images:
                raise SystemExit(
                    f"OUTPUT CHECK FAILED (gpu_throughput.py): decode ({codec}) read {decoded} images "
                    f"of {args.images}"
                )
            result[f"decode_only_{codec}_images_per_s"] = timed(decode, args.repeats)
        zstd = str(work / "images-zstd.zarr")
        plain_logits = np.full((args.images, loaded.num_classes), np.nan, dtype=np.float32)
        loop = plain_loop(zstd, model, prep, device, args.batch, dtype, channels_last, plain_logits)
        result["plain_loop_images_per_s"] = timed(loop, args.repeats)
        first = torch.from_numpy(np.asarray(zarr.open_group(zstd, mode="r")["images"][: args.batch]))
        checks.append(
            compare_logits(
                f"plain loop ({dtype}), first {len(first)} images",
                plain_logits[: len(first)],
                forward(fp32_model, prep, first.to(device), torch.float32, False),
                tolerance,
                reference="plain fp32 forward",
            )
        )
        runs = []
        for r in range(args.repeats):
            summary = dask_infer.run(
                zstd,
                str(work / f"out-{r}.zarr"),
                model=args.model,
                weights=weights,
                compress=recipe,
                batch_size=args.batch,
                chunk_size=args.chunk,
                progress=False,
                echo=None,
            )
            runs.append(summary.images_per_second)
            checks.append(
                compare_logits(
                    f"dask-infer ({recipe}), round {r + 1}",
                    zarr.open_group(str(work / f"out-{r}.zarr"), mode="r")["logits"][:],
                    plain_logits,
                    tolerance,
                    reference="plain loop",
                )
            )
        result["dask_infer_images_per_s"] = max(runs)
        result["dask_infer_cluster"] = summary.cluster
        alone = result.get("model_alone_compiled_images_per_s", result["model_alone_eager_images_per_s"])
        result["ratio_end_to_end_vs_model_alone"] = max(runs) / float(alone)  # type: ignore[arg-type]
        result["ratio_vs_plain_loop"] = max(runs) / float(result["plain_loop_images_per_s"])  # type: ignore[arg-type]
        result["median_dask_infer_images_per_s"] = statistics.median(runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["output_tolerance"] = str(tolerance)
    result["output_checks"] = [c.to_dict() for c in checks]
    result["output_checks_ok"] = all(c.ok for c in checks)
    text = json.dumps(result, indent=2)
    print(text)
    for c in checks:
        print(c.line())
    if args.json:
        args.json.write_text(text)
    exit_if_failed(checks, "gpu_throughput.py")


if __name__ == "__main__":
    main()
