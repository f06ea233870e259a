"""The Python entry point: ``dask_infer.run``, taking ``RunConfig``'s fields as keywords.

The options are not restated here: the signature and the docstring are built from
:class:`~dask_infer.config.RunConfig`, so Python, YAML and the CLI take the same set.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xarray as xr
from distributed import Client

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.workflows.array_input import store_of
from dask_infer.workflows.array_run import run_array
from dask_infer.workflows.run import run_config
from dask_infer.workflows.summary import RunSummary

__all__ = ["run"]


def run(
    input: str | xr.DataArray | None = None,
    output: str | None = None,
    *,
    config: RunConfig | str | Path | None = None,
    client: Client | None = None,
    echo: Callable[[str], None] | None = print,
    **options: Any,
) -> RunSummary:
    # The docstring is set below, from RunConfig's.
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DaskInferError(f"unknown option(s) {unknown}; known options: {', '.join(sorted(known))}")
    array = None
    if isinstance(input, xr.DataArray):
        whole = store_of(input, options)
        if whole is None:
            array, input = input, f"<DataArray {input.name if input.name is not None else 'images'!r}>"
        else:
            input, options = whole
    given = {"input": input, "output": output, **options}
    explicit = {k: v for k, v in given.items() if v is not None}
    if isinstance(config, RunConfig):
        cfg = config.replace(**explicit)
    elif config is not None:
        cfg = RunConfig.from_yaml(config, **explicit)
    else:
        missing = [k for k in ("input", "output") if k not in explicit]
        if missing:
            raise DaskInferError(f"missing {' and '.join(missing)}: give both input and output Zarr paths")
        cfg = RunConfig.from_dict(explicit)
    if array is not None:
        return run_array(array, cfg, client=client, echo=echo)
    return run_config(cfg, client=client, echo=echo)


def _signature() -> inspect.Signature:
    """``run``'s signature with every ``RunConfig`` field as a keyword (``None``: the default)."""
    own = inspect.signature(run).parameters
    params = [own["input"], own["output"]]
    for f in dataclasses.fields(RunConfig):
        if f.name not in ("input", "output"):
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [own["config"], own["client"], own["echo"]]
    return inspect.Signature(params, return_annotation=RunSummary)


def _docstring() -> str:
    options = (RunConfig.__doc__ or "").split("Parameters\n    ----------\n", 1)[1].rstrip()
    return f"""Run a model over a Zarr image dataset and write its predictions to Zarr.

    Every option of :class:`~dask_infer.config.RunConfig` is a keyword argument; one
    left out (or ``None``) takes its value from ``config``, else the default.

    ``input`` may also be an ``xarray.DataArray``. A ``dask_infer.open_images`` DataArray
    of a whole store runs on that store. Any other (a selection, one opened with
    ``xarray.open_zarr``, one held in memory) runs as :func:`dask_infer.predict` does and
    is written with ``to_zarr``, with the same variables, attrs and summary; the options
    that need a store to read (``resume``, pipelines, ``report``, ...) are refused for it.

    Parameters
    ----------
{options}
    config
        A :class:`RunConfig` or a YAML file with any of these options; explicit
        arguments win over it.
    client
        Run on this ``distributed.Client`` instead of starting or connecting a cluster.
    echo
        Where progress lines go (``None`` for silence).

    Returns
    -------
    RunSummary
        Images, seconds, images/s, output path, cluster, placement and per-stage figures.
    """


run.__signature__ = _signature()  # type: ignore[attr-defined]
run.__doc__ = _docstring()
