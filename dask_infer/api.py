"""The Python entry point: ``dask_infer.run`` with the same options as the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from distributed import Client

from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.workflows.run import RunSummary, run_config

__all__ = ["run"]


def run(
    input: str | None = None,
    output: str | None = None,
    *,
    model: str | None = None,
    weights: str | None = None,
    num_classes: int | None = None,
    variable: str | None = None,
    layout: str | None = None,
    outputs: tuple[str, ...] | list[str] | None = None,
    top_k: int | None = None,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    device: str | None = None,
    stages: int | None = None,
    balance: str | None = None,
    placement: str | None = None,
    replicas: int | None = None,
    rebalance: float | None | bool = None,
    report: str | None = None,
    summary: str | None = None,
    compress: str | None = None,
    calibration_images: int | None = None,
    overwrite: bool | None = None,
    progress: bool | None = None,
    storage_options: dict[str, Any] | None = None,
    config: RunConfig | str | Path | None = None,
    client: Client | None = None,
    echo: Callable[[str], None] | None = print,
) -> RunSummary:
    """Run a torchvision model over a Zarr image dataset and write predictions to Zarr.

    Parameters
    ----------
    input, output
        Zarr stores: the images, and where results go (must not exist unless
        ``overwrite``; never the input).
    model, weights, num_classes
        torchvision model name (default ``"resnet50"``), local weights file
        (``.pt``/``.pth`` state_dict or ``.safetensors``; without it the model is
        random), classifier size (default: from the weights).
    variable, layout
        Which array of the input store, and its axis order (``auto``/``NHWC``/``NCHW``).
    outputs, top_k
        Results to write (``logits``, ``probabilities``, ``top_k``) and how many classes
        ``top_k`` keeps.
    chunk_size, batch_size
        Images per task and per forward pass (default: chosen from data and device).
    scheduler, n_workers, threads_per_worker, device
        An existing scheduler's address, or the local cluster's size; device
        ``auto``/``cpu``/``cuda``.
    stages, balance
        Split the model into sequential stages balanced by ``time``/``flops``/``params``/``memory``.
    placement, replicas
        Where stages run: ``"data"`` (every worker holds every stage), ``"pipeline"``
        (stage k on its own workers), ``"hybrid"`` (``replicas`` pipelines) or ``"auto"``
        (the default: data-parallel when the model fits one worker, else pipelined).
    rebalance
        Re-cut a pipeline after its first chunks when the slowest stage takes more than
        this factor of the mean (default 1.1); ``False`` never re-cuts.
    report, summary
        Write a ``distributed.performance_report`` HTML file, and the run summary as JSON.
    compress, calibration_images
        Compression plan (``"bf16"``, ``"0-2:int8,3-4:bf16"``, ...) and how many input
        images int8 calibrates on.
    overwrite, progress, storage_options
        Replace an existing output; show a progress bar; fsspec options.
    config
        A :class:`RunConfig` or a YAML file with any of these options; explicit
        arguments win over it.
    client
        Run on this ``distributed.Client`` instead of starting a cluster.
    echo
        Where progress lines go (``None`` for silence).

    Returns
    -------
    RunSummary
        Images, seconds, images/s, output path and cluster used.
    """
    given = {
        "input": input,
        "output": output,
        "model": model,
        "weights": weights,
        "num_classes": num_classes,
        "variable": variable,
        "layout": layout,
        "outputs": tuple(outputs) if outputs is not None else None,
        "top_k": top_k,
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "scheduler": scheduler,
        "n_workers": n_workers,
        "threads_per_worker": threads_per_worker,
        "device": device,
        "stages": stages,
        "balance": balance,
        "placement": placement,
        "replicas": replicas,
        "report": report,
        "summary": summary,
        "compress": compress,
        "calibration_images": calibration_images,
        "overwrite": overwrite,
        "progress": progress,
        "storage_options": storage_options,
    }
    explicit: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if rebalance is not None and not isinstance(rebalance, bool):
        explicit["rebalance"] = rebalance
    if isinstance(config, RunConfig):
        cfg = config.replace(**explicit)
    elif config is not None:
        cfg = RunConfig.from_yaml(config, **explicit)
    else:
        missing = [k for k in ("input", "output") if k not in explicit]
        if missing:
            raise DaskInferError(f"missing {' and '.join(missing)}: give both input and output Zarr paths")
        cfg = RunConfig.from_dict(explicit)
    if rebalance is False:
        cfg = cfg.replace(rebalance=None)
    return run_config(cfg, client=client, echo=echo)
