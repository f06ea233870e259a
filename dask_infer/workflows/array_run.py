"""``run`` given a DataArray that is not a whole store: :func:`predict`, written with ``to_zarr``.

A selection, a computed array or one opened with ``xarray.open_zarr`` has no store that
``run`` could read chunk by chunk with resume, so it runs as ``predict`` runs (one model
task per chunk along the image axis, the model loaded once per worker) and the lazy
result is written with ``Dataset.to_zarr``. The output is the same store a path run
writes: the same variables, dims and coordinates, ``dask_infer_complete`` and the run
summary in its attrs, so :func:`dask_infer.open_results` and a later ``--overwrite``
treat it as any run's output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import xarray as xr
import zarr
from distributed import Client, progress, wait

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.io.outputs import quiet_zarr
from dask_infer.io.stores import absolute_location, replace_store, store_exists
from dask_infer.io.writable import check_run_targets
from dask_infer.workflows.cluster import scheduler_workers
from dask_infer.workflows.lazy import PREDICT_OPTIONS, predict
from dask_infer.workflows.run import _connected
from dask_infer.workflows.summary import RunSummary, write_summary

__all__ = ["ARRAY_RUN_OPTIONS", "run_array"]

_CLUSTER_OPTIONS = frozenset(
    {
        "scheduler",
        "scheduler_file",
        "tls_ca_file",
        "tls_cert",
        "tls_key",
        "n_workers",
        "threads_per_worker",
        "memory_limit",
    }
)
ARRAY_RUN_OPTIONS = (
    PREDICT_OPTIONS
    | _CLUSTER_OPTIONS
    | {
        "input",
        "output",
        "overwrite",
        "progress",
        "summary",
        "chunk_size",
        "storage_options",
    }
)
"""The :class:`RunConfig` fields a run of a DataArray that is not a whole store takes."""


def _unsupported(config: RunConfig) -> list[str]:
    """Options set away from their defaults that only a run over a store can honour."""
    defaults = RunConfig(input=config.input, output=config.output)
    return sorted(
        name
        for name in config.to_dict()
        if name not in ARRAY_RUN_OPTIONS and getattr(config, name) != getattr(defaults, name)
    )


def run_array(
    array: xr.DataArray,
    config: RunConfig,
    *,
    client: Client | None = None,
    echo: Callable[[str], None] | None = print,
) -> RunSummary:
    """Run ``config``'s model over ``array`` and write the predictions to ``config.output``.

    Parameters
    ----------
    array
        Images, image axis first, as :func:`dask_infer.predict` takes them.
    config
        The run's options; its ``input`` only names the array in the summary.
    client
        An existing client; by default one is connected or started as for a store.
    echo
        Where progress lines go; ``None`` for silence.

    Raises
    ------
    DaskInferError
        For options only a run over a Zarr store takes (resume, pipelines, reports, ...),
        or an output that exists without ``overwrite``.
    """
    say = echo or (lambda _line: None)
    unsupported = _unsupported(config)
    if unsupported:
        raise DaskInferError(
            f"option(s) {unsupported} need a Zarr store to read, and this DataArray is not one store's "
            "whole image array; leave them out, or pass the store's path (or a dask_infer.open_images "
            "result) to run"
        )
    output = absolute_location(config.output)
    options = config.storage_options or None
    if store_exists(output, options) and not config.overwrite:
        raise DaskInferError(
            f"output {config.output!r} exists; pass --overwrite (overwrite=True) to replace it"
        )
    check_run_targets(output, summary=config.summary)
    # Zarr chunks are regular: a selection's uneven image chunks become the largest of them.
    size = config.chunk_size or (max(array.chunks[0]) if array.chunks else None)
    if size is not None:
        array = array.chunk({array.dims[0]: size})
    given = {name: getattr(config, name) for name in PREDICT_OPTIONS}
    defaults = RunConfig(input=config.input, output=config.output)
    wanted = {k: v for k, v in given.items() if v != getattr(defaults, k) or k == "model"}
    with _connected(config, client) as (connected, choice):
        say(f"dashboard: {connected.dashboard_link}")
        result = predict(array, client=connected, **wanted)
        if config.overwrite:
            replace_store(output, options)
        start = time.perf_counter()
        writing = connected.compute(
            result.to_zarr(output, mode="w-", compute=False, storage_options=options, consolidated=False)
        )
        if config.progress:
            progress(writing)
        wait(writing)
        writing.result()
        seconds = time.perf_counter() - start
        images = int(result.sizes["image"])
        chunks = result["valid"].chunks[0] if result["valid"].chunks else (images,)
        valid = xr.open_zarr(output, storage_options=options, consolidated=False)["valid"].values
        summary = RunSummary(
            images=images,
            seconds=seconds,
            images_per_second=images / seconds if seconds > 0 else 0.0,
            output=output,
            model=str(result.attrs["model"]),
            pretrained=bool(result.attrs["pretrained"]),
            chunks=len(chunks),
            chunk_size=int(max(chunks)),
            workers=len(scheduler_workers(connected)),
            model_loads=len(scheduler_workers(connected)),
            cluster=choice.describe() if choice else f"scheduler {connected.scheduler_info()['address']}",
            dashboard=connected.dashboard_link,
            placement={"mode": "data", "reason": "a DataArray runs as dask_infer.predict: data-parallel"},
            invalid_images=int((~valid).sum()),
        )
        # The last reference to the lazy graph: its runtime handle goes, and the model is unloaded.
        del result, writing
    _finalize(output, options, config, array, summary)
    if config.summary:
        write_summary(config.summary, summary.to_dict())
    say(summary.format())
    return summary


def _finalize(
    output: str, options: dict[str, Any] | None, config: RunConfig, array: xr.DataArray, summary: RunSummary
) -> None:
    """Mark the output complete, with the run's config and summary, and consolidate its metadata."""
    kwargs: dict[str, Any] = {"mode": "r+"}
    if options:
        kwargs["storage_options"] = options
    group = zarr.open_group(store=output, **kwargs)
    source = array.name if array.name is not None else "images"
    group.attrs.update(
        {
            "dask_infer_complete": True,
            "source": f"<DataArray {source!r}>",
            "run_summary": summary.to_dict(),
            "config": {k: v for k, v in config.to_dict().items() if k in ARRAY_RUN_OPTIONS},
        }
    )
    with quiet_zarr():
        zarr.consolidate_metadata(group.store)
