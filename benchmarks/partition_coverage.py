"""Split every torchvision classifier into stages and report which split exactly.

Each model is built with random weights, partitioned on a small batch (64x64 where the
model accepts it, else 224x224), and the stages are checked to reproduce the whole
model's output bit for bit (``partition_model(verify=True)``).

Usage: ``python benchmarks/partition_coverage.py [--stages 4] [--balance flops] [MODEL ...]``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from dask_infer.errors import DaskInferError
from dask_infer.partition import available_models, build_model, partition_model

SIZES = (64, 224)


def split_one(name: str, stages: int, balance: str) -> tuple[str, str]:
    """``(status, detail)`` of partitioning model ``name``."""
    model = build_model(name).module
    error = "no input size tried"
    for size in SIZES:
        try:
            _, plan = partition_model(
                model, stages, balance=balance, sample=(1, 3, size, size), name=name, repeats=1
            )
        except DaskInferError as exc:
            error = str(exc)
            if "does not fit" in error:
                continue
            return "FAIL", error
        return "ok", f"{size}x{size}  imbalance {plan.imbalance:.3f}  of {plan.num_candidates} cut points"
    return "FAIL", error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--balance", default="flops")
    parser.add_argument("models", nargs="*", help="default: every torchvision classifier")
    args = parser.parse_args(argv)
    names = args.models or list(available_models())
    failures = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        status, detail = split_one(name, args.stages, args.balance)
        print(f"{status:4}  {name:22}  {time.perf_counter() - t0:6.1f}s  {detail}", flush=True)
        if status != "ok":
            failures.append(name)
        gc.collect()
    split = len(names) - len(failures)
    print(
        f"\n{split}/{len(names)} torchvision classifiers split into {args.stages} stages by {args.balance} "
        f"with bit-identical outputs (torch {torch.__version__}, {time.perf_counter() - start:.0f}s)"
    )
    if failures:
        print("not split: " + ", ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
