"""Time compressed models against a plain PyTorch fp32 loop on this machine's CPU.

Usage: ``python benchmarks/compression.py [--cache DIR] [--threads N] [--json OUT]``

The digits ResNet-18 (32x32, trained and cached on first use) is timed with each
recipe, with its held-out accuracy; a randomly initialised ResNet-50 at 224x224 is
timed on a few images, for speed only. Each row is the median of several timed
rounds after a warm-up (which also compiles the ``compile`` recipes); each round times the
plain PyTorch fp32 model and the compressed one back to back, and the speed-up is the
median of the per-round ratios, which a busy shared machine disturbs least.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torchvision

from dask_infer.io.samples import digits_images, digits_split
from dask_infer.partition.compress import compress_module
from dask_infer.partition.measure import count_flops, serialized_size, time_call
from dask_infer.partition.models import build_model
from dask_infer.workflows.preprocess import Preprocess
from dask_infer.zoo import digits_model

RECIPES = ("fp32", "bf16", "bf16+channels_last", "int8", "int8+compile", "prune=0.3", "prune=0.3+compile")


def _paired_times(
    plain: Callable[[], object], other: Callable[[], object], rounds: int
) -> tuple[float, float, float]:
    """Median seconds of each, and the median per-round ratio plain/other.

    The two are timed alternately, so a busy moment on a shared machine slows both
    sides of a round and the ratio stays meaningful.
    """
    pairs = [(time_call(plain, repeats=1), time_call(other, repeats=1)) for _ in range(rounds)]
    return (
        statistics.median(p for p, _ in pairs),
        statistics.median(o for _, o in pairs),
        statistics.median(p / o for p, o in pairs),
    )


def _bench(
    name: str,
    module: torch.nn.Module,
    x: torch.Tensor,
    calibration: torch.Tensor,
    rounds: int,
    eval_x: torch.Tensor | None,
    eval_y: torch.Tensor | None,
) -> list[dict]:
    rows = []
    for recipe in RECIPES:
        start = time.perf_counter()
        stage = compress_module(module, recipe, calibration=calibration)
        with torch.no_grad():
            stage(x)  # warm-up; compiles when the recipe says so
            prepared = time.perf_counter() - start
            # The baseline is a plain PyTorch fp32 forward of the untouched model, in the same rounds.
            plain_s, seconds, speedup = _paired_times(partial(module, x), partial(stage, x), rounds)
            accuracy = None
            if eval_x is not None and eval_y is not None:
                logits = torch.cat([stage(eval_x[i : i + 128]) for i in range(0, len(eval_x), 128)])
                accuracy = float((logits.argmax(1) == eval_y).float().mean())
        size, packed = serialized_size(stage.module)
        rows.append(
            {
                "model": name,
                "recipe": recipe,
                "ms_per_batch": 1e3 * seconds,
                "plain_fp32_ms_per_batch": 1e3 * plain_s,
                "speedup_vs_plain": speedup,
                "mflops_per_image": count_flops(stage.forward_eager, x[:1]) / 1e6,
                "size_mb": size / 1e6,
                "size_zlib_mb": packed / 1e6,
                "held_out_accuracy": accuracy,
                "prepare_s": prepared,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="digits model cache (default $DASK_INFER_CACHE)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--rounds", type=int, default=7, help="timed rounds per recipe (plain and compressed)"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = build_model("resnet18", weights=digits_model(args.cache))
    images, labels = digits_images(loaded.input_size)
    held = digits_split(len(labels))
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.no_grad():
        x = prep(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    rows = _bench(
        "digits resnet18 32px b64",
        loaded.module,
        x[held][:64].contiguous(),
        x[~held][::8],
        args.rounds,
        x[held],
        y[held],
    )
    resnet50 = torchvision.models.resnet50(num_classes=1000).eval()
    big = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    # Speed only: a random model has no accuracy to keep, so random calibration is harmless here.
    calib = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    rows += _bench("random resnet50 224px b4", resnet50, big, calib, max(3, args.rounds // 2), None, None)

    header = (
        f"{'model':<26} {'recipe':<20} {'ms/batch':>9} {'plain ms':>9} {'x plain':>8} "
        f"{'MFLOP/img':>10} {'MB':>7} "
        f"{'zlib MB':>8} {'acc':>7}"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    print(header)
    for r in rows:
        acc = r.get("held_out_accuracy")
        print(
            f"{r['model']:<26} {r['recipe']:<20} {r['ms_per_batch']:>9.2f} "
            f"{r['plain_fp32_ms_per_batch']:>9.2f} "
            f"{r.get('speedup_vs_plain', 1.0):>8.2f} "
            f"{r.get('mflops_per_image', float('nan')):>10.1f} {r.get('size_mb', float('nan')):>7.2f} "
            f"{r.get('size_zlib_mb', float('nan')):>8.2f} {'' if acc is None else f'{100 * acc:.2f}%':>7}"
        )
    text = json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
