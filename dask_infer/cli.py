"""The ``dask-infer`` command: run, partition, evaluate, models, sample, ingest, demo.

``run`` has one option per :class:`~dask_infer.config.RunConfig` field, built from it.
Commands import what they run inside their bodies, so ``--help`` and ``models`` start
without importing torch's whole stack or distributed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from dask_infer.config import RunConfig, option_help
from dask_infer.errors import DaskInferError
from dask_infer.input_options import INTERPOLATIONS
from dask_infer.options import (
    ACTIVATIONS,
    BALANCE_MODES,
    DEFAULT_BALANCE,
    DEVICES,
    LAYOUTS,
    LOGITS_DTYPES,
    MISSING_CHUNKS,
    PLACEMENTS,
)

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


class _OneLineUsageError(click.UsageError):
    """A bad option or argument, shown like every other bad input: one ``error:`` line."""

    def show(self, file: IO[Any] | None = None) -> None:
        """Write the one line to ``file`` (stderr by default)."""
        hint = f"; see '{self.ctx.command_path} --help'" if self.ctx is not None else ""
        click.echo(f"error: {self.format_message().rstrip('.')}{hint}", file=file, err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    """``exc`` shown in one line; a bare command's help (no arguments given) stays as it is."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError | _OneLineUsageError):
        return exc
    return _OneLineUsageError(exc.format_message(), exc.ctx)


class _Group(click.Group):
    """A command group whose usage errors, its own and its commands', are one line and exit 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dask-infer")
def main() -> None:
    """Batch inference of torchvision models over Zarr image datasets, on Dask."""


_balance_option = click.option(
    "--balance",
    type=click.Choice(BALANCE_MODES),
    default=DEFAULT_BALANCE,
    show_default=True,
    help="Cost the stages are balanced by.",
)


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


_FLAGS = {"n_workers": "--workers", "threads_per_worker": "--threads"}
_CHOICES = {
    "layout": LAYOUTS,
    "missing_chunks": MISSING_CHUNKS,
    "device": DEVICES,
    "balance": BALANCE_MODES,
    "placement": PLACEMENTS,
    "activation": ACTIVATIONS,
    "interpolation": INTERPOLATIONS,
    "logits_dtype": LOGITS_DTYPES,
}
_PYTHON_ONLY = ("transform",)
"""``RunConfig`` fields that hold Python objects, so have no flag."""
_METAVARS = {"dims": "ROLE=DIM[,...]", "bands": "N[,N...]", "mean": "X[,X...]", "std": "X[,X...]"}


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return None


def _run_options(func: F) -> F:
    """One option per ``RunConfig`` field, its help from the field's description.

    Every option defaults to ``None`` (not given), so a ``--config`` file's values and
    then ``RunConfig``'s defaults apply; the help shows those defaults.
    """
    helps = option_help()
    func = click.option("--config", "config_file", type=click.Path(), help="YAML file of these options.")(
        func
    )
    func = click.option(
        "--no-rebalance", is_flag=True, help="Never re-cut a running pipeline, nor re-route its shared stage."
    )(func)
    for field in reversed(dataclasses.fields(RunConfig)):
        if field.name in _PYTHON_ONLY:
            continue
        name, text = field.name, helps[field.name]
        default = _default(field)
        if default not in (None, False, {}, ()):
            shown = ",".join(default) if isinstance(default, tuple) else default
            text += f"  [default: {shown}]"
        kwargs: dict[str, Any] = {"help": text, "default": None}
        decls = [_flag(name), name]
        if name in _CHOICES:
            kwargs["type"] = click.Choice(_CHOICES[name])
        elif name in ("progress", "normalize"):
            decls = [f"--{name}/--no-{name}", name]
        elif name in _METAVARS:
            kwargs["metavar"] = _METAVARS[name]
        elif field.type == "bool":
            kwargs.update(is_flag=True)
        elif name == "outputs":
            kwargs["metavar"] = "KIND[,KIND...]"
        elif name in ("storage_options", "model_kwargs"):
            kwargs["metavar"] = "JSON"
        elif field.type in ("int", "int | None"):
            kwargs["type"] = click.IntRange(min=1)
        elif field.type in ("float", "float | None"):
            kwargs["type"] = float
        func = click.option(*decls, **kwargs)(func)
    return func


_MODEL_HELP = "Model: a torchvision name, package.module:factory or a .pt2 file."
_KWARGS_EXAMPLE = '{"num_classes": 10}'


def _json_option(flag: str, text: str, example: str) -> Any:
    """The JSON value of ``flag``'s ``text``, or one line saying how to write it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DaskInferError(f"{flag} {text!r} is not JSON ({exc.msg}); give e.g. '{example}'") from None


def _importable_here() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` does.

    Then ``--model package.module:factory`` imports a package of the folder the command runs
    in; a local cluster's worker processes inherit the path.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _parse_run_options(options: dict[str, Any], no_rebalance: bool) -> dict[str, Any]:
    """Turn the command line's text into ``RunConfig`` values."""
    if options.get("outputs") is not None:
        options["outputs"] = tuple(o.strip() for o in options["outputs"].split(",") if o.strip())
    if options.get("storage_options") is not None:
        text = options["storage_options"]
        try:
            options["storage_options"] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DaskInferError(
                f"--storage-options {text!r} is not JSON ({exc.msg}); give e.g. '{{\"anon\": true}}'"
            ) from None
    if options.get("model_kwargs") is not None:
        options["model_kwargs"] = _json_option("--model-kwargs", options["model_kwargs"], _KWARGS_EXAMPLE)
    if no_rebalance:
        if options.get("rebalance") is not None:
            raise DaskInferError("--rebalance and --no-rebalance both given; keep one")
        options["rebalance"] = False
    return options


@main.command()
@_run_options
@_clean_errors
def run(config_file: str | None, no_rebalance: bool, **options: Any) -> None:
    """Run a model over an image dataset and write predictions to Zarr."""
    from dask_infer.api import run as run_api

    _importable_here()
    try:
        run_api(config=config_file, echo=_echo, **_parse_run_options(options, no_rebalance))
    except KeyboardInterrupt:
        click.echo(
            "interrupted: the output is incomplete; run the same command with --resume to finish it",
            err=True,
        )
        sys.exit(130)


@main.command()
@click.argument("output")
@click.option(
    "--kind",
    type=click.Choice(["digits", "photos"]),
    default="digits",
    show_default=True,
    help="scikit-learn's handwritten digits (labelled, with a held-out split) or crops of its sample photos.",
)
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
@click.option("--model", default="resnet50", show_default=True, help=_MODEL_HELP)
@click.option("--model-kwargs", metavar="JSON", help="Keyword arguments of a model factory (JSON).")
@click.option("--weights", help="Local weights file (default: random weights; fine for profiling).")
@click.option("--stages", type=click.IntRange(min=1), default=2, show_default=True, help="Number of stages.")
@_balance_option
@click.option(
    "--batch-size",
    "--batch",
    "batch_size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Images in the profiling sample.",
)
@click.option("--size", type=int, help="Input height and width (default: the model's).")
@click.option(
    "--threads", type=int, help="Torch threads to time with: those each stage will run with (default: all)."
)
@click.option(
    "--fused",
    is_flag=True,
    help="With --balance time: time the stages as compiled (+compile) stages run, pointwise ops "
    "fused into the layer before them, and never cut between the two.",
)
@click.option("--json", "json_path", type=click.Path(), help="Also write the plan as JSON here.")
@_clean_errors
def partition(
    model: str,
    model_kwargs: str | None,
    weights: str | None,
    stages: int,
    balance: str,
    batch_size: int,
    size: int | None,
    threads: int | None,
    fused: bool,
    json_path: str | None,
) -> None:
    """Split a model into balanced sequential stages and print the plan."""
    from dask_infer.models import build_model
    from dask_infer.partition import format_plan, partition_model

    if fused and balance != "time":
        raise DaskInferError(
            f"--fused times the stages, but --balance is {balance!r}; use --balance time, or drop --fused"
        )
    _importable_here()
    kwargs = _json_option("--model-kwargs", model_kwargs, _KWARGS_EXAMPLE) if model_kwargs else None
    loaded = build_model(model, weights=weights, model_kwargs=kwargs)
    side = size or loaded.input_size
    _, plan = partition_model(
        loaded.module,
        stages,
        balance=balance,
        sample=(batch_size, 3, side, side),
        name=loaded.name,
        threads=threads,
        fused=fused,
    )
    click.echo(format_plan(plan))
    if json_path:
        Path(json_path).write_text(plan.to_json())
        click.echo(f"plan written to {json_path}")


@main.command()
@click.option("--input", "input_", required=True, help="Input Zarr store of images.")
@click.option("--model", required=True, help=_MODEL_HELP)
@click.option("--model-kwargs", metavar="JSON", help="Keyword arguments of a model factory (JSON).")
@click.option("--weights", help="Local weights file (.pt/.pth/.safetensors), or cached torchvision weights.")
@click.option(
    "--compress",
    required=True,
    multiple=True,
    help="Compression plan, as for `run --compress`; give it again to compare several in one call.",
)
@click.option(
    "--stages",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Split into this many stages first.",
)
@_balance_option
@click.option("--images", "n_images", type=int, default=512, show_default=True, help="Images to evaluate.")
@click.option(
    "--calibration-images", type=int, default=128, show_default=True, help="Images int8 calibrates on."
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass."
)
@click.option("--variable", help="Image array inside the input store.")
@click.option("--output", help="Zarr store whose attrs receive the report (created if missing).")
@_clean_errors
def evaluate(
    input_: str,
    model: str,
    model_kwargs: str | None,
    weights: str | None,
    compress: tuple[str, ...],
    stages: int,
    balance: str,
    n_images: int,
    calibration_images: int,
    batch_size: int,
    variable: str | None,
    output: str | None,
) -> None:
    """How far a compressed model's answers move from the uncompressed model's, and how fast it is.

    Held-out images (the dataset's ``held_out`` flag) are evaluated when there are any,
    and the others calibrate int8. With several ``--compress``, each recipe is evaluated
    on the same images (fp32 timed again beside each), then all are compared in a table.
    """
    from dask_infer.evaluation import REPORT_ATTR, REPORTS_ATTR, format_comparison, write_report
    from dask_infer.evaluation import evaluate as evaluate_api
    from dask_infer.io.stores import normalise_location, store_exists
    from dask_infer.partition.compress import CompressionPlan

    if output is not None and normalise_location(output) == normalise_location(input_):
        raise DaskInferError(f"output {output!r} is the input; choose another store for the report")
    for text in compress:  # every plan checked before any is evaluated
        CompressionPlan.coerce(text).validate(stages)
    _importable_here()
    kwargs = _json_option("--model-kwargs", model_kwargs, _KWARGS_EXAMPLE) if model_kwargs else None
    reports = []
    for text in compress:
        report = evaluate_api(
            input_,
            model=model,
            model_kwargs=kwargs,
            weights=weights,
            compress=text,
            stages=stages,
            balance=balance,
            n_images=n_images,
            calibration_images=calibration_images,
            batch_size=batch_size,
            variable=variable,
        )
        click.echo(report.format())
        reports.append(report)
    if len(reports) > 1:
        click.echo(format_comparison(reports))
    if output is not None:
        if not store_exists(output):
            import zarr

            zarr.open_group(output, mode="w")
        write_report(reports[0] if len(reports) == 1 else reports, output)
        attr = REPORT_ATTR if len(reports) == 1 else REPORTS_ATTR
        click.echo(f"report written to the attrs of {output} ({attr})")


@main.command()
def models() -> None:
    """List the models that can be run: name, task, input size and parameters."""
    from dask_infer.models.registry import model_table

    rows = [("model", "task", "input", "params")]
    rows += [(m.name, m.task, f"{m.input_size}x{m.input_size}", m.params_text) for m in model_table()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


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
    from dask_infer.models.zoo import digits_model

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
