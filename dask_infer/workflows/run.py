"""run(config): validate, start or connect a cluster, submit the graph, write, summarise."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from distributed import Client, as_completed
from tqdm.auto import tqdm

from dask_infer._version import __version__
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.io.images import ImageSource, describe_source, image_coords
from dask_infer.io.outputs import check_output_location, create_output, finalize_output
from dask_infer.partition.models import LoadedModel, build_model
from dask_infer.workflows.cluster import cuda_device_count, make_client
from dask_infer.workflows.graph import plan_chunks, submit_chunks
from dask_infer.workflows.runtime import ModelRuntime, RuntimeSpec

__all__ = ["RunSummary", "run_config"]


@dataclass(frozen=True)
class RunSummary:
    """What a run did: counts, time, throughput and where the results are."""

    images: int
    seconds: float
    images_per_second: float
    output: str
    model: str
    pretrained: bool
    chunks: int
    chunk_size: int
    workers: int
    model_loads: int
    cluster: str
    dashboard: str | None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON and output attrs."""
        return asdict(self)

    def format(self) -> str:
        """Human summary, a few lines."""
        return (
            f"{self.images} images in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s), "
            f"{self.chunks} chunks of {self.chunk_size} on {self.workers} worker(s) [{self.cluster}]\n"
            f"results: {self.output}  (xarray.open_zarr({self.output!r}))"
        )


def _class_names(loaded: LoadedModel, source: ImageSource) -> tuple[str, ...] | None:
    if loaded.class_names is not None:
        return loaded.class_names
    if source.class_names is not None and len(source.class_names) == loaded.num_classes:
        return source.class_names
    return None


def _runtime_spec(
    config: RunConfig,
    loaded: LoadedModel,
    torch_threads: int | None,
    cuts: tuple[str, ...],
    source: ImageSource,
) -> RuntimeSpec:
    return RuntimeSpec(
        model=loaded.name,
        weights=loaded.weights,
        num_classes=loaded.num_classes,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        outputs=config.outputs,
        top_k=min(config.top_k, loaded.num_classes),
        batch_size=config.batch_size,
        device=config.device,
        torch_threads=torch_threads,
        cut_points=cuts,
        compress=config.compress,
        calibration=source,
        calibration_images=config.calibration_images,
    )


def _check_compression(
    config: RunConfig, loaded: LoadedModel, cuts: tuple[str, ...]
) -> dict[str, Any] | None:
    """Refuse a plan that cannot be applied here, before any cluster starts."""
    if config.compress is None:
        return None
    import torch

    from dask_infer.partition import split_model
    from dask_infer.partition.compress import check_recipe
    from dask_infer.partition.recipe import CompressionPlan

    plan = CompressionPlan.coerce(config.compress)
    gpu = cuda_device_count() > 0 and config.device != "cpu"
    device = torch.device("cuda" if gpu else "cpu")
    stages = split_model(loaded.module, list(cuts)) if cuts else [loaded.module]
    for index, stage in enumerate(stages):
        check_recipe(
            stage, plan.recipe_for(index), device=device, has_calibration=True, label=f"stage {index}"
        )
    return plan.to_dict()


def _stage_cuts(
    config: RunConfig, loaded: LoadedModel, say: Callable[[str], None]
) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    if config.stages == 1:
        return (), None
    from dask_infer.partition import format_plan, partition_model

    _, plan = partition_model(
        loaded.module,
        config.stages,
        balance=config.balance,
        sample=(1, 3, loaded.input_size, loaded.input_size),
        name=loaded.name,
    )
    say(format_plan(plan))
    return tuple(plan.cut_points), plan.to_dict()


def run_config(
    config: RunConfig,
    *,
    client: Client | None = None,
    echo: Callable[[str], None] | None = print,
) -> RunSummary:
    """Run inference as ``config`` says; see :func:`dask_infer.run` for the options.

    Parameters
    ----------
    config
        The validated run configuration.
    client
        An existing ``distributed.Client`` to run on (for Jupyter); by default the
        run connects to ``config.scheduler`` or starts a local cluster, and closes
        what it started.
    echo
        Where progress lines go; ``None`` for silence.
    """
    say = echo or (lambda _line: None)
    source = describe_source(
        config.input, variable=config.variable, layout=config.layout, storage_options=config.storage_options
    )
    check_output_location(
        config.input, config.output, overwrite=config.overwrite, storage_options=config.storage_options
    )
    loaded = build_model(config.model, weights=config.weights, num_classes=config.num_classes)
    if not loaded.pretrained:
        say(
            f"warning: no --weights given, so {loaded.name} is randomly initialised and its predictions "
            "are meaningless (weights are never downloaded; pass a local .pt/.pth/.safetensors file)"
        )
    cuts, plan = _stage_cuts(config, loaded, say)
    compression = _check_compression(config, loaded, cuts)

    own_cluster = client is None
    choice = None
    if client is None:
        client, choice = make_client(
            scheduler=config.scheduler,
            device=config.device,
            n_workers=config.n_workers,
            threads_per_worker=config.threads_per_worker,
        )
    name = f"dask-infer-runtime-{uuid.uuid4().hex[:8]}"
    try:
        say(f"dashboard: {client.dashboard_link}")
        workers = client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            raise DaskInferError(f"the Dask cluster at {client.scheduler_info()['address']} has no workers")
        gpu = cuda_device_count() > 0 and config.device != "cpu"
        target = config.chunk_size or (512 if gpu else 64)
        chunks = plan_chunks(source.n_images, source.storage_chunk, target=target, min_tasks=2 * len(workers))
        spec = _runtime_spec(config, loaded, choice.torch_threads if choice else None, cuts, source)
        output = create_output(
            config.output,
            n_images=source.n_images,
            num_classes=loaded.num_classes,
            top_k=spec.top_k,
            chunk=chunks.size,
            outputs=config.outputs,
            image_coords=image_coords(source),
            class_names=_class_names(loaded, source),
            attrs={"dask_infer_complete": False},
            overwrite=config.overwrite,
            storage_options=config.storage_options,
        )
        say(f"loading {loaded.name} on {len(workers)} worker(s)")
        client.register_plugin(ModelRuntime(spec, name), name=name)
        start = time.perf_counter()
        futures = submit_chunks(client, source, output, name, chunks, label=loaded.name)
        with tqdm(
            total=source.n_images, unit="img", disable=not config.progress, desc=loaded.name, leave=True
        ) as bar:
            for future in as_completed(futures):
                bar.update(future.result())
        seconds = time.perf_counter() - start
        stats = client.run(lambda dask_worker: dask_worker.plugins[name].stats())
        summary = RunSummary(
            images=source.n_images,
            seconds=seconds,
            images_per_second=source.n_images / seconds,
            output=config.output,
            model=loaded.name,
            pretrained=loaded.pretrained,
            chunks=len(chunks.bounds),
            chunk_size=chunks.size,
            workers=len(workers),
            model_loads=sum(s["loads"] for s in stats.values()),
            cluster=choice.describe() if choice else f"scheduler {client.scheduler_info()['address']}",
            dashboard=client.dashboard_link,
        )
        finalize_output(
            output,
            {
                "dask_infer_complete": True,
                "dask_infer_version": __version__,
                "model": loaded.name,
                "weights": loaded.weights,
                "pretrained": loaded.pretrained,
                "input_size": loaded.input_size,
                "normalize_mean": list(loaded.mean),
                "normalize_std": list(loaded.std),
                "source": config.input,
                "source_variable": source.variable,
                "config": config.to_dict(),
                "stage_plan": plan or {},
                "compression": compression or {},
                "run_summary": summary.to_dict(),
            },
        )
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)
        if own_cluster:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
    say(summary.format())
    return summary
