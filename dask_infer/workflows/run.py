"""run(config): validate, start or connect a cluster, submit the graph, write, summarise."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from distributed import Client
from tqdm.auto import tqdm

from dask_infer._version import __version__
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError
from dask_infer.io.images import ImageSource, describe_source, image_coords
from dask_infer.io.outputs import check_output_location, create_output, finalize_output
from dask_infer.partition import format_plan
from dask_infer.partition.models import LoadedModel, build_model
from dask_infer.partition.plan import StagePlan
from dask_infer.workflows.cluster import cuda_device_count, device_memory, make_client
from dask_infer.workflows.feed import Execution, execute, runtime_stats, seconds_per_image
from dask_infer.workflows.graph import plan_chunks
from dask_infer.workflows.monitor import (
    format_stages,
    gpu_summary,
    maybe_performance_report,
    stage_summary,
    write_summary,
)
from dask_infer.workflows.plan import Placement, plan_placement, workers_from_scheduler
from dask_infer.workflows.runtime import RuntimeSpec

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
    placement: dict[str, Any] = field(default_factory=dict)
    loaded_stages: dict[str, list[int]] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    gpus: dict[str, Any] = field(default_factory=dict)
    rebalance: dict[str, Any] | None = None

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
    placement: Placement,
    chunk_size: int,
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
        stage_map=tuple(placement.stages_on().items()),
        warmup_images=chunk_size,
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
) -> tuple[tuple[str, ...], StagePlan | None]:
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
    return tuple(plan.cut_points), plan


def _placement(
    config: RunConfig, client: Client, plan: StagePlan | None, loaded: LoadedModel, gpu: bool
) -> Placement:
    """The placement for this cluster, checked against its workers' memory before work starts."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        raise DaskInferError(f"the Dask cluster at {client.scheduler_info()['address']} has no workers")
    memory = client.run(device_memory, config.device) if config.device != "cpu" else {}
    return plan_placement(
        config.placement,
        plan,
        workers_from_scheduler(info, memory),
        replicas=config.replicas,
        batch_size=config.batch_size or (256 if gpu else 32),
        model=loaded.name,
    )


def _partition_here(
    model: str,
    weights: str | None,
    num_classes: int,
    stages: int,
    sample: tuple[int, ...],
    threads: int | None,
) -> dict[str, Any]:
    """Task body: partition the model by time as this worker runs it."""
    from dask_infer.partition import partition_model

    module = build_model(model, weights=weights, num_classes=num_classes).module
    return partition_model(
        module, stages, balance="time", sample=sample, name=model, repeats=3, threads=threads
    ).plan.to_dict()


def _profile_on_worker(
    client: Client,
    loaded: LoadedModel,
    worker: str,
    plan: StagePlan,
    batch: int,
    torch_threads: int | None,
) -> StagePlan:
    """The time-balanced plan measured on a stage worker, with its torch threads and the run's batch.

    Stage times depend on the threads and batch size they run with (early layers use
    threads better than late ones), so a profile taken here, with all of this
    machine's threads and batch 1, can cut a pipeline of one-thread workers far from
    balance.
    """
    nthreads = client.scheduler_info(n_workers=-1)["workers"][worker]["nthreads"]
    size = loaded.input_size
    future = client.submit(
        _partition_here,
        loaded.name,
        loaded.weights,
        loaded.num_classes,
        plan.num_stages,
        (batch, 3, size, size),
        torch_threads or max(1, nthreads),
        workers=[worker],
        pure=False,
        key=f"{loaded.name}-profile-{uuid.uuid4().hex[:8]}",
    )
    return StagePlan.from_dict(future.result())


def _chunk_target(loaded: LoadedModel, source: ImageSource, gpu: bool) -> int:
    """Images per task from the model's FLOPs per image and the decoded image size."""
    import torch

    from dask_infer.partition.measure import count_flops
    from dask_infer.workflows.graph import chunk_target

    sample = torch.zeros(1, 3, loaded.input_size, loaded.input_size)
    flops = count_flops(loaded.module, sample)
    height, width, channels = source.image_shape
    itemsize = 1 if source.dtype == "uint8" else 2 if source.dtype in ("uint16", "float16") else 4
    return chunk_target(flops, height * width * channels * itemsize, gpu=gpu)


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
        n_workers = config.n_workers
        if n_workers is None and config.scheduler is None and config.placement in ("pipeline", "hybrid"):
            n_workers = config.stages * (config.replicas or 1)
        client, choice = make_client(
            scheduler=config.scheduler,
            device=config.device,
            n_workers=n_workers,
            threads_per_worker=config.threads_per_worker,
        )
    run: Execution | None = None
    try:
        say(f"dashboard: {client.dashboard_link}")
        gpu = cuda_device_count() > 0 and config.device != "cpu"
        placement = _placement(config, client, plan, loaded, gpu)
        workers = client.scheduler_info(n_workers=-1)["workers"]
        target = config.chunk_size or _chunk_target(loaded, source, gpu)
        in_flight = 8 * placement.num_stages * placement.replicas if placement.pipelined else 0
        chunks = plan_chunks(
            source.n_images, source.storage_chunk, target=target, min_tasks=max(2 * len(workers), in_flight)
        )
        if plan is not None and placement.pipelined and config.balance == "time" and not gpu:
            plan = _profile_on_worker(
                client,
                loaded,
                placement.stage_workers(0)[0],
                plan,
                min(config.batch_size or 32, chunks.size),
                choice.torch_threads if choice else None,
            )
            cuts = tuple(plan.cut_points)
            say("re-profiled on " + placement.stage_workers(0)[0] + ":\n" + format_plan(plan))
            placement = _placement(config, client, plan, loaded, gpu)
            compression = _check_compression(config, loaded, cuts)
        say(placement.describe())
        spec = _runtime_spec(
            config, loaded, choice.torch_threads if choice else None, cuts, source, placement, chunks.size
        )
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
        say(f"loading {loaded.name} on {len(placement.workers)} worker(s)")
        run = Execution(spec, placement)
        with maybe_performance_report(client, config.report):
            run.register(client)
            start = time.perf_counter()
            with tqdm(
                total=source.n_images, unit="img", disable=not config.progress, desc=loaded.name, leave=True
            ) as bar:
                execute(client, config, loaded, source, output, chunks, run, bar.update, say)
            seconds = time.perf_counter() - start
        placement = run.placement
        stats = runtime_stats(client, run.active[-1])
        stage_rows = stage_summary(stats, time.perf_counter() - run.last_start, placement.num_stages)
        if run.rebalance is not None and run.rebalance.recut:
            run.rebalance = replace(
                run.rebalance, measured_after=seconds_per_image(stats, placement.num_stages)
            )
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
            model_loads=run.loads,
            cluster=choice.describe() if choice else f"scheduler {client.scheduler_info()['address']}",
            dashboard=client.dashboard_link,
            placement=placement.to_dict(),
            loaded_stages={address: s["held_stages"] for address, s in sorted(stats.items())},
            stages=stage_rows,
            gpus=gpu_summary(stats),
            rebalance=run.rebalance.to_dict() if run.rebalance else None,
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
                "stage_plan": plan.to_dict() if plan else {},
                "placement": placement.to_dict(),
                "rebalance": summary.rebalance or {},
                "compression": compression or {},
                "run_summary": summary.to_dict(),
            },
        )
        if config.summary:
            write_summary(config.summary, summary.to_dict())
    finally:
        if run is not None:
            for name in list(run.active):
                run.release(client, name)
        if own_cluster:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
    say(summary.format())
    if any(row["images"] for row in summary.stages):
        say(format_stages(summary.stages))
    return summary
