"""Split every torchvision classifier into stages and report which split exactly.

Each model is built with random weights, partitioned on a small batch (64x64 where the
model accepts it, else 224x224), and the stages are checked to reproduce the whole
model's output bit for bit: by ``partition_model(verify=True)`` on the profiling sample,
and again here, by running the stages one after another (``run_stages``) on a fresh
random input and comparing with a plain PyTorch forward of the whole model
(``torch.equal``; tolerance: none). A model whose stages differ makes the script exit
with status 1 and one ``OUTPUT CHECK FAILED`` line.

Usage: ``python benchmarks/partition_coverage.py [--stages 4] [--balance flops] [MODEL ...]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from _common import Check, Tolerance, compare_logits, exit_if_failed, machine_line

from dask_infer import DaskInferError
from dask_infer.models import available_models, build_model
from dask_infer.partition import partition_model, run_stages

SIZES = (64, 224)
# Stages are the whole model's own ops on the same weights: their output must be bit-identical.
TOLERANCE = Tolerance(exact=True)


def split_one(name: str, stages: int, balance: str) -> tuple[str, str, Check | None]:
    """``(status, detail, check)`` of partitioning model ``name``."""
    model = build_model(name).module
    error = "no input size tried"
    for size in SIZES:
        try:
            parts, plan = partition_model(
                model, stages, balance=balance, sample=(1, 3, size, size), name=name, repeats=1
            )
        except DaskInferError as exc:
            error = str(exc)
            if "does not fit" in error:
                continue
            return "FAIL", error, None
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(12345))
        with torch.no_grad():
            check = compare_logits(
                f"{name}: {stages} stages", run_stages(parts, x), model(x), TOLERANCE, reference="whole model"
            )
        detail = f"{size}x{size}  imbalance {plan.imbalance:.3f}  of {plan.num_candidates} cut points"
        if not check.ok:
            return "FAIL", f"{detail}; {check.line()}", check
        return "ok", detail, check
    return "FAIL", error, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--balance", default="flops")
    parser.add_argument("models", nargs="*", help="default: every torchvision classifier")
    args = parser.parse_args(argv)
    names = args.models or list(available_models())
    failures = []
    checks: list[Check] = []
    print(machine_line(), flush=True)
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        status, detail, check = split_one(name, args.stages, args.balance)
        print(f"{status:4}  {name:22}  {time.perf_counter() - t0:6.1f}s  {detail}", flush=True)
        if status != "ok":
            failures.append(name)
        if check is not None:
            checks.append(check)
        gc.collect()
    split = len(names) - len(failures)
    print(
        f"\n{split}/{len(names)} torchvision classifiers split into {args.stages} stages by {args.balance} "
        f"with bit-identical outputs (torch {torch.__version__}, {time.perf_counter() - start:.0f}s)"
    )
    if failures:
        print("not split: " + ", ".join(failures))
    exit_if_failed(checks, "partition_coverage.py")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
