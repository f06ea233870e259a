"""The ``dask-infer`` command: run, demo, sample, ingest, models."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from dask_infer.config import OUTPUT_KINDS
from dask_infer.errors import DaskInferError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _clean_errors(func: F) -> F:
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DaskInferError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _echo(line: str) -> None:
    click.echo(line, err=line.startswith("warning:"))


@click.group()
@click.version_option(package_name="dask-infer")
def main() -> None:
    """Batch inference of torchvision models over Zarr image datasets, on Dask."""


@main.command()
@click.option("--input", "input_", help="Input Zarr store of images (path or fsspec URL).")
@click.option("--output", help="Output Zarr store for the predictions.")
@click.option("--model", help="torchvision model name  [default: resnet50]")
@click.option("--weights", help="Local weights: .pt/.pth state_dict or .safetensors.")
@click.option("--num-classes", type=int, help="Classifier size (default: from the weights).")
@click.option("--variable", help="Image array inside the input store, if it holds several.")
@click.option("--layout", type=click.Choice(["auto", "NHWC", "NCHW"]), help="Axis order of the images.")
@click.option("--outputs", help=f"Comma-separated results to write: {', '.join(OUTPUT_KINDS)}.")
@click.option("--top-k", type=int, help="Best classes kept per image  [default: 5]")
@click.option("--chunk-size", type=int, help="Images per task (default: from the data).")
@click.option("--batch-size", type=int, help="Images per forward pass (default: by device).")
@click.option("--scheduler", help="Address of an existing Dask scheduler (default: start one).")
@click.option(
    "--workers", "n_workers", type=int, help="Local cluster workers (default: one per GPU, else 1)."
)
@click.option("--threads", "threads_per_worker", type=int, help="Threads per local worker.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the model runs.")
@click.option("--stages", type=int, help="Split the model into this many sequential stages.")
@click.option(
    "--balance", type=click.Choice(["time", "flops", "params", "memory"]), help="Stage balance cost."
)
@click.option(
    "--placement",
    type=click.Choice(["auto", "data", "pipeline", "hybrid"]),
    help="Where stages run: every worker holds all (data), stage k on its own workers (pipeline), "
    "replicated pipelines (hybrid), or chosen from memory and stage sizes (auto)  [default: auto]",
)
@click.option("--replicas", type=int, help="Pipelines side by side for --placement hybrid.")
@click.option(
    "--rebalance",
    type=float,
    help="Re-cut a pipeline after its first chunks when max/mean stage time exceeds this  [default: 1.1]",
)
@click.option("--no-rebalance", is_flag=True, help="Never re-cut a running pipeline.")
@click.option("--report", type=click.Path(), help="Write a Dask performance report (HTML) here.")
@click.option("--summary", type=click.Path(), help="Write the run summary (JSON) here.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing output store.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--config", "config_file", type=click.Path(), help="YAML file of these options.")
@_clean_errors
def run(
    input_: str | None,
    outputs: str | None,
    no_progress: bool,
    no_rebalance: bool,
    rebalance: float | None,
    config_file: str | None,
    **options: Any,
) -> None:
    """Run a model over an image dataset and write predictions to Zarr."""
    from dask_infer.api import run as run_api

    run_api(
        input=input_,
        outputs=tuple(o.strip() for o in outputs.split(",")) if outputs else None,
        progress=False if no_progress else None,
        rebalance=False if no_rebalance else rebalance,
        config=config_file,
        echo=_echo,
        **options,
    )


@main.command()
@click.argument("output")
@click.option("--kind", type=click.Choice(["digits", "photos"]), default="digits", show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Image height and width.")
@click.option("--count", type=int, help="Number of images (default: all digits, 64 photos).")
@click.option("--chunk", type=int, default=64, show_default=True, help="Images per storage chunk.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@_clean_errors
def sample(output: str, kind: str, size: int, count: int | None, chunk: int, overwrite: bool) -> None:
    """Write the embedded sample dataset to OUTPUT (a Zarr store)."""
    from dask_infer.io.samples import write_sample

    ds = write_sample(output, kind=kind, size=size, count=count, chunk=chunk, overwrite=overwrite)
    click.echo(f"wrote {ds.sizes['image']} {kind} images of {size}x{size} to {output}")


@main.command()
@click.argument("folder")
@click.argument("output")
@click.option("--size", type=int, default=224, show_default=True, help="Image height and width.")
@click.option("--chunk", type=int, default=64, show_default=True, help="Images per storage chunk.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@_clean_errors
def ingest(folder: str, output: str, size: int, chunk: int, overwrite: bool) -> None:
    """Turn FOLDER of images (one subfolder per class) into a Zarr dataset OUTPUT."""
    from dask_infer.io.ingest import ingest_folder

    ds = ingest_folder(folder, output, size=size, chunk=chunk, overwrite=overwrite)
    click.echo(
        f"wrote {ds.sizes['image']} images of {size}x{size} "
        f"in {len(ds.attrs['class_names'])} classes to {output}"
    )


@main.command()
@click.option("--model", default="resnet50", show_default=True, help="torchvision model name.")
@click.option("--weights", help="Local weights file (default: random weights; fine for profiling).")
@click.option("--stages", type=int, default=2, show_default=True, help="Number of stages.")
@click.option(
    "--balance", type=click.Choice(["time", "flops", "params", "memory"]), default="time", show_default=True
)
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size of the profiling sample.")
@click.option("--size", type=int, help="Input height and width (default: the model's).")
@click.option(
    "--threads", type=int, help="Torch threads to time with: those each stage will run with (default: all)."
)
@click.option("--json", "json_path", type=click.Path(), help="Also write the plan as JSON here.")
@_clean_errors
def partition(
    model: str,
    weights: str | None,
    stages: int,
    balance: str,
    batch: int,
    size: int | None,
    threads: int | None,
    json_path: str | None,
) -> None:
    """Split a model into balanced sequential stages and print the plan."""
    from dask_infer.partition import build_model, format_plan, partition_model

    loaded = build_model(model, weights=weights)
    side = size or loaded.input_size
    _, plan = partition_model(
        loaded.module, stages, balance=balance, sample=(batch, 3, side, side), name=model, threads=threads
    )
    click.echo(format_plan(plan))
    if json_path:
        Path(json_path).write_text(plan.to_json())
        click.echo(f"plan written to {json_path}")


@main.command()
@click.option("--input", "input_", required=True, help="Input Zarr store of images.")
@click.option("--model", required=True, help="torchvision model name.")
@click.option("--weights", help="Local weights file (.pt/.pth/.safetensors).")
@click.option("--compress", required=True, help="Compression plan, as for `run --compress`.")
@click.option("--stages", type=int, default=1, show_default=True, help="Split into this many stages first.")
@click.option(
    "--balance", type=click.Choice(["time", "flops", "params", "memory"]), default="flops", show_default=True
)
@click.option("--images", "n_images", type=int, default=512, show_default=True, help="Images to evaluate.")
@click.option(
    "--calibration-images", type=int, default=128, show_default=True, help="Images int8 calibrates on."
)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--variable", help="Image array inside the input store.")
@click.option("--output", help="Zarr store whose attrs receive the report (created if missing).")
@_clean_errors
def evaluate(
    input_: str,
    model: str,
    weights: str | None,
    compress: str,
    stages: int,
    balance: str,
    n_images: int,
    calibration_images: int,
    batch_size: int,
    variable: str | None,
    output: str | None,
) -> None:
    """How far a compressed model's answers move from the uncompressed model's.

    Held-out images (the dataset's ``held_out`` flag) are evaluated when there are any,
    and the others calibrate int8.
    """
    from dask_infer.evaluation import evaluate as evaluate_api
    from dask_infer.evaluation import write_report
    from dask_infer.io.stores import normalise_location, store_exists

    if output is not None and normalise_location(output) == normalise_location(input_):
        raise DaskInferError(f"output {output!r} is the input; choose another store for the report")
    report = evaluate_api(
        input_,
        model=model,
        weights=weights,
        compress=compress,
        stages=stages,
        balance=balance,
        n_images=n_images,
        calibration_images=calibration_images,
        batch_size=batch_size,
        variable=variable,
    )
    click.echo(report.format())
    if output is not None:
        if not store_exists(output):
            import zarr

            zarr.open_group(output, mode="w")
        write_report(report, output)
        click.echo(f"report written to the attrs of {output} (compression_evaluation)")


@main.command()
def models() -> None:
    """List the torchvision classification models that can be run."""
    from dask_infer.partition.models import available_models

    click.echo("\n".join(available_models()))


@main.command()
@click.option("--output", default="demo-output", show_default=True, help="Folder for the demo's files.")
@click.option("--workers", "n_workers", type=int, help="Local cluster workers.")
@_clean_errors
def demo(output: str, n_workers: int | None) -> None:
    """Build the sample dataset, train (once) the digits model, run it, report accuracy."""
    import numpy as np
    import xarray as xr

    from dask_infer.api import run as run_api
    from dask_infer.io.samples import write_sample
    from dask_infer.zoo import digits_model

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    images, results = str(folder / "digits.zarr"), str(folder / "predictions.zarr")
    write_sample(images, kind="digits", size=224, overwrite=True)
    click.echo(f"sample dataset: {images}")
    weights = folder / "digits-resnet18.safetensors"
    if not weights.is_file():
        click.echo("training the digits model (ResNet-18, about two minutes, once)")
    weights = digits_model(folder)
    click.echo(f"model weights: {weights}")
    run_api(
        images,
        results,
        model="resnet18",
        weights=str(weights),
        overwrite=True,
        n_workers=n_workers,
        echo=_echo,
    )
    ds = xr.open_zarr(results)
    predicted = ds["top_k_class"].isel(rank=0).values
    held_out = ds["held_out"].values
    correct = predicted == ds["label"].values
    click.echo(
        f"accuracy on {int(held_out.sum())} held-out digits: {100 * float(np.mean(correct[held_out])):.2f}% "
        f"(all {correct.size}: {100 * float(np.mean(correct)):.2f}%)"
    )
    click.echo(f"open the results with: xarray.open_zarr({results!r})")


if __name__ == "__main__":
    main()
