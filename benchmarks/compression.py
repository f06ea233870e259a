"""Time compressed models against plain PyTorch fp32 on this machine's CPU, and check their outputs.

Usage::

    python benchmarks/compression.py [--cache DIR] [--threads N] [--rounds 7] [--resnet50-rounds 3]
        [--recipes fp32,bf16,...] [--no-resnet50] [--json OUT]

Two models:

- the digits ResNet-18 (32x32, trained on scikit-learn's digits and cached on first use),
  timed on batches of 64 held-out digits; accuracy and top-1 agreement with the fp32
  model are measured on all 539 held-out digits;
- a randomly initialised ResNet-50 at 224x224, timed on batches of 4 random images, for
  speed (a random model has no accuracy to keep); its outputs are still checked, on
  ``--resnet50-check`` random images.

Recipes (``RECIPES``): fp32, fp32+channels_last, bf16, bf16+channels_last, fp16,
fp16+channels_last, int8, int8+compile, prune=0.3, prune=0.3+compile and
prune-unstructured=0.5 (digits only). Every recipe is timed against two plain PyTorch
fp32 baselines of the untouched model, in the same rounds: channels-first (NCHW,
contiguous input) and channels-last (NHWC model and input). A recipe's like-for-like
speed-up is against the baseline of its own layout (NHWC for ``+channels_last`` recipes,
which are timed on the same NHWC input; NCHW for the others); both are reported. Each
round times the three back to back after a warm-up (which also compiles the ``compile``
recipes), and a speed-up is the median of the per-round ratios, which a busy shared
machine disturbs least.

Every recipe's logits are compared with the plain fp32 NCHW model's on the same images
(and so are the NHWC baseline's); a recipe outside its tolerance (``TOLERANCES``: max
relative error ``max|got - ref| / max|ref|`` and top-1 agreement) makes the script exit
with status 1 and one ``OUTPUT CHECK FAILED`` line, after printing every figure. A
recipe this CPU cannot run (fp16 on some builds, int8 without PT2E) is reported as not
run, with the reason, and has no figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import torch
import torchvision
from _common import Check, Tolerance, compare_logits, exit_if_failed, machine_info, machine_line

from dask_infer.io.samples import digits_images, digits_split
from dask_infer.models import Preprocess, build_model
from dask_infer.models.zoo import digits_model
from dask_infer.partition.compress import CompressionRecipe, compress_module
from dask_infer.partition.compress.measure import count_flops, serialized_size, time_call

RECIPES = (
    "fp32",
    "fp32+channels_last",
    "bf16",
    "bf16+channels_last",
    "fp16",
    "fp16+channels_last",
    "int8",
    "int8+compile",
    "prune=0.3",
    "prune=0.3+compile",
    "prune-unstructured=0.5",
)
# Unstructured pruning changes neither FLOPs nor speed (it only makes the file compress
# better) and wrecks an untrained-for-it random model's logits: its figures (size and
# accuracy) come from the digits model only.
RESNET50_SKIP = ("prune-unstructured=0.5",)

# Logits of each recipe against the plain fp32 NCHW model on the same images.
# max_rel_err is max|got - ref| / max|ref| over the whole batch of logits.
TOLERANCES = {
    # Same arithmetic up to kernel choice (layout, compilation).
    "fp32": Tolerance(max_rel_err=1e-5),
    "fp16": Tolerance(max_rel_err=1e-2, min_agreement=0.99),
    "bf16": Tolerance(max_rel_err=5e-2, min_agreement=0.98),
    "int8": Tolerance(max_rel_err=0.1, min_agreement=0.97),
    # Structured pruning removes 30% of the channels without fine-tuning: lossy by design.
    "prune": Tolerance(min_agreement=0.95),
    # Half of every layer's weights zeroed without fine-tuning: the accuracy loss is the
    # figure being reported (about 66-74% of the digits kept), so the bound only catches a
    # broken path: a constant or random output agrees on about 10% of ten classes.
    "prune-unstructured": Tolerance(min_agreement=0.3),
}


def tolerance_for(recipe: CompressionRecipe) -> Tolerance:
    """The tolerance of a recipe's family: layout and ``compile`` do not loosen it."""
    if recipe.prune == "structured":
        return TOLERANCES["prune"]
    if recipe.prune == "unstructured":
        return TOLERANCES["prune-unstructured"]
    if recipe.quantize == "int8":
        return TOLERANCES["int8"]
    return TOLERANCES[recipe.precision]


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``data`` in batches of exactly ``batch`` (the last padded), so a compiled
    module sees the one shape it was timed with and never recompiles."""
    out = []
    for i in range(0, len(data), batch):
        chunk = data[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, data[: batch - n]])
        out.append(fn(chunk)[:n].float())
    return torch.cat(out)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous()


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _bench(
    name: str,
    module: torch.nn.Module,
    x: torch.Tensor,
    calibration: torch.Tensor,
    rounds: int,
    check_x: torch.Tensor,
    check_y: torch.Tensor | None,
    recipes: list[str],
) -> tuple[list[dict[str, Any]], list[Check], list[dict[str, str]]]:
    """Time, size and check every recipe on one model.

    ``x`` is the timed batch; ``check_x`` the images whose logits are compared (with
    ``check_y`` their labels, or ``None`` when the model has no accuracy to measure).
    """
    batch = len(x)
    x_nchw, x_nhwc = _nchw(x), _nhwc(x)
    check_nchw = _nchw(check_x)
    plain_nchw = module
    plain_nhwc = copy.deepcopy(module).to(memory_format=torch.channels_last)
    checks: list[Check] = []
    with torch.no_grad():
        reference = _batched(plain_nchw, check_nchw, batch)
        nhwc_logits = _batched(lambda b: plain_nhwc(_nhwc(b)), check_nchw, batch)
        checks.append(
            compare_logits(
                f"{name}: plain fp32 NHWC baseline",
                nhwc_logits,
                reference,
                TOLERANCES["fp32"],
                reference="plain fp32 NCHW",
            )
        )
        plain_nchw(x_nchw)  # warm-up of both baselines
        plain_nhwc(x_nhwc)
    fp32_accuracy = None
    if check_y is not None:
        fp32_accuracy = float((reference.argmax(1) == check_y).float().mean())

    rows: list[dict[str, Any]] = []
    not_run: list[dict[str, str]] = []
    for text in recipes:
        recipe = CompressionRecipe.parse(text)
        start = time.perf_counter()
        try:
            stage = compress_module(module, recipe, calibration=calibration)
            with torch.no_grad():
                stage(x_nchw)  # warm-up; compiles when the recipe says so
        except Exception as exc:  # e.g. fp16 or int8 kernels this CPU or build lacks
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            print(f"{name}: {text}: NOT RUN on this CPU ({why})", flush=True)
            not_run.append({"model": name, "recipe": text, "reason": why})
            continue
        prepared = time.perf_counter() - start
        # A channels-last recipe gets the channels-last input its baseline gets (what
        # dask-infer's preprocessing hands it), so neither side pays for a layout change.
        x_own = x_nhwc if recipe.channels_last else x_nchw
        with torch.no_grad():
            stage(x_own)
            triples = [
                (
                    time_call(partial(plain_nchw, x_nchw), repeats=1),
                    time_call(partial(plain_nhwc, x_nhwc), repeats=1),
                    time_call(partial(stage, x_own), repeats=1),
                )
                for _ in range(rounds)
            ]
            logits = _batched(stage, check_nchw, batch)
        tolerance = tolerance_for(recipe)
        check = compare_logits(f"{name}: {text}", logits, reference, tolerance, reference="plain fp32 NCHW")
        checks.append(check)
        vs_nchw = statistics.median(a / c for a, _, c in triples)
        vs_nhwc = statistics.median(b / c for _, b, c in triples)
        size, packed = serialized_size(stage.module)
        accuracy = None if check_y is None else float((logits.argmax(1) == check_y).float().mean())
        rows.append(
            {
                "model": name,
                "recipe": text,
                "batch": batch,
                "ms_per_batch": 1e3 * statistics.median(c for _, _, c in triples),
                "plain_fp32_nchw_ms_per_batch": 1e3 * statistics.median(a for a, _, _ in triples),
                "plain_fp32_nhwc_ms_per_batch": 1e3 * statistics.median(b for _, b, _ in triples),
                "speedup_vs_fp32_nchw": vs_nchw,
                "speedup_vs_fp32_nhwc": vs_nhwc,
                "like_for_like_baseline": "fp32 NHWC" if recipe.channels_last else "fp32 NCHW",
                "speedup_like_for_like": vs_nhwc if recipe.channels_last else vs_nchw,
                "mflops_per_image": count_flops(stage.forward_eager, x_nchw[:1]) / 1e6,
                "size_mb": size / 1e6,
                "size_zlib_mb": packed / 1e6,
                "held_out_accuracy": accuracy,
                "fp32_held_out_accuracy": fp32_accuracy,
                "accuracy_change_pt": None if accuracy is None else 100 * (accuracy - fp32_accuracy),
                "check_images": len(check_x),
                "top1_agreement_vs_fp32": check.agreement,
                "max_rel_err_vs_fp32": check.max_rel_err,
                "tolerance": str(tolerance),
                "output_check": "ok" if check.ok else "FAILED",
                "rounds": rounds,
                "prepare_s": prepared,
            }
        )
        print(
            f"{name}: {text}: {rows[-1]['ms_per_batch']:.2f} ms/batch, "
            f"{rows[-1]['speedup_like_for_like']:.2f}x {rows[-1]['like_for_like_baseline']}; {check.line()}",
            flush=True,
        )
    return rows, checks, not_run


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':<26} {'recipe':<23} {'ms/batch':>9} {'NCHW ms':>8} {'NHWC ms':>8} "
        f"{'x NCHW':>7} {'x NHWC':>7} {'x like':>7} {'MFLOP/img':>10} {'MB':>7} {'zlib MB':>8} "
        f"{'acc':>7} {'chg pt':>7} {'agree':>8} {'rel err':>8} {'check':>6}"
    )
    print(header)
    for r in rows:
        change = r["accuracy_change_pt"]
        print(
            f"{r['model']:<26} {r['recipe']:<23} {r['ms_per_batch']:>9.2f} "
            f"{r['plain_fp32_nchw_ms_per_batch']:>8.2f} {r['plain_fp32_nhwc_ms_per_batch']:>8.2f} "
            f"{r['speedup_vs_fp32_nchw']:>7.2f} {r['speedup_vs_fp32_nhwc']:>7.2f} "
            f"{r['speedup_like_for_like']:>7.2f} {r['mflops_per_image']:>10.1f} {r['size_mb']:>7.2f} "
            f"{r['size_zlib_mb']:>8.2f} {_pct(r['held_out_accuracy']):>7} "
            f"{'' if change is None else f'{change:+.2f}':>7} {_pct(r['top1_agreement_vs_fp32']):>8} "
            f"{r['max_rel_err_vs_fp32']:>8.1e} {r['output_check']:>6}"
        )
    print(
        "x NCHW / x NHWC: median per-round speed-up over plain PyTorch fp32 channels-first / "
        "channels-last; x like: over the baseline of the recipe's own layout (NHWC for +channels_last). "
        "agree, rel err: top-1 agreement and max relative logit error vs plain fp32 NCHW on the same images."
    )
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["recipe"]: r for r in rows if r["model"] == model}
        if "fp32" in by and "prune=0.3" in by:
            a, b = by["fp32"]["mflops_per_image"], by["prune=0.3"]["mflops_per_image"]
            print(f"{model}: prune=0.3: {a:.1f} -> {b:.1f} MFLOP per image ({100 * (b / a - 1):+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="digits model cache (default $DASK_INFER_CACHE)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per recipe, digits model")
    parser.add_argument(
        "--resnet50-rounds",
        type=int,
        default=None,
        help="timed rounds per recipe, ResNet-50 (default rounds/2, >= 3)",
    )
    parser.add_argument(
        "--resnet50-check", type=int, default=8, help="random images whose ResNet-50 logits are checked"
    )
    parser.add_argument("--no-resnet50", action="store_true", help="only the digits model")
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"comma-separated recipes (default: {','.join(RECIPES)})"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in recipes:
        CompressionRecipe.parse(r)  # a typo fails before any work
    resnet50_rounds = args.resnet50_rounds or max(3, args.rounds // 2)

    machine = machine_info()
    print(machine_line(machine), f"{args.threads} torch threads", sep="; ", flush=True)
    started = datetime.now(UTC)

    loaded = build_model("resnet18", weights=digits_model(args.cache))
    images, labels = digits_images(loaded.input_size)
    held = torch.from_numpy(digits_split(len(labels)))
    prep = Preprocess(loaded.input_size, loaded.mean, loaded.std)
    with torch.no_grad():
        x = prep(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    rows, checks, not_run = _bench(
        "digits resnet18 32px b64",
        loaded.module,
        x[held][:64],
        x[~held][::8],
        args.rounds,
        x[held],
        y[held],
        recipes,
    )
    if not args.no_resnet50:
        resnet50 = torchvision.models.resnet50(num_classes=1000).eval()
        check = torch.randn(
            max(4, args.resnet50_check), 3, 224, 224, generator=torch.Generator().manual_seed(0)
        )
        # Speed only: a random model has no accuracy to keep, so random calibration is harmless here.
        calib = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        more = _bench(
            "random resnet50 224px b4",
            resnet50,
            check[:4],
            calib,
            resnet50_rounds,
            check,
            None,
            [r for r in recipes if r not in RESNET50_SKIP],
        )
        rows += more[0]
        checks += more[1]
        not_run += more[2]

    print()
    print(machine_line(machine), f"{args.threads} torch threads", sep="; ")
    print(f"command: python {' '.join(sys.argv)}; started {started:%Y-%m-%d %H:%M} UTC")
    _print_table(rows)
    for n in not_run:
        print(f"NOT RUN: {n['model']}: {n['recipe']}: {n['reason']}")
    print("output checks (logits vs plain PyTorch fp32 NCHW on the same images):")
    for c in checks:
        print("  " + c.line())
    result = {
        "machine": machine,
        "threads": args.threads,
        "command": "python " + " ".join(sys.argv),
        "started_utc": started.isoformat(timespec="seconds"),
        "rounds": {"digits": args.rounds, "resnet50": resnet50_rounds},
        "tolerances": {k: str(v) for k, v in TOLERANCES.items()},
        "rows": rows,
        "not_run": not_run,
        "checks": [c.to_dict() for c in checks],
        "all_checks_ok": all(c.ok for c in checks),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    exit_if_failed(checks, "compression.py")


if __name__ == "__main__":
    main()
