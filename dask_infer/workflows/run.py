"""run(config) as a few named steps: prepare, connect, lay out, write, execute, summarise.

1. :func:`_prepare` checks everything that needs no cluster: the input, the output
   location, the model and its weights, the stage cut and the compression plan.
2. :func:`_connected` starts the local cluster this machine suits, connects to a
   scheduler, or uses the caller's client; it closes only what it started.
3. :func:`_lay_out` decides the placement and the chunks; a time-balanced CPU pipeline
   is profiled again on a stage worker, re-placed and re-checked in the same step.
4. The output store is created, the runtimes registered, the chunks fed (re-cutting a
   pipeline on the way), and the summary written into the output's attrs.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from distributed import Client, Future
from tqdm.auto import tqdm

from dask_infer._version import __version__
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError
from dask_infer.io.images import ImageSource, image_coords
from dask_infer.io.outputs import (
    OutputTarget,
    create_output,
    done_chunks,
    finalize_output,
    invalid_images,
    open_output,
)
from dask_infer.io.stores import absolute_location, normalise_location
from dask_infer.models import LoadedModel, build_model
from dask_infer.models.features import check_feature_compression
from dask_infer.models.heads import OutputShapes, probe_outputs
from dask_infer.models.preprocess import PreprocessSpec
from dask_infer.models.sources import ModelSource, model_label
from dask_infer.models.weights import file_sha256
from dask_infer.options import default_batch_size
from dask_infer.partition import StagePlan, format_plan, partition_model, profile_memo, split_model
from dask_infer.partition.compress import CompressionError, CompressionPlan, check_recipe
from dask_infer.partition.compress.auto import auto_bound, is_auto
from dask_infer.partition.compress.measure import forward_cost
from dask_infer.workflows.checks import checked_model, open_input
from dask_infer.workflows.cluster import (
    ClusterChoice,
    cuda_device_count,
    device_memory,
    make_client,
    scheduler_workers,
    worker_deaths,
)
from dask_infer.workflows.cores import usable_cores
from dask_infer.workflows.environment import check_worker_environment
from dask_infer.workflows.execution import Execution, runtime_stats, seconds_per_image
from dask_infer.workflows.feed import feed, min_chunks
from dask_infer.workflows.graph import (
    Chunks,
    chunk_target,
    group_name,
    split_chunks,
    submit_chunks,
    submit_pipeline,
)
from dask_infer.workflows.monitor import maybe_performance_report
from dask_infer.workflows.pauses import PauseReporter
from dask_infer.workflows.placement import (
    DEVICE_RESOURCE,
    Placement,
    WorkerInfo,
    choose_placement,
    share_boundary,
    stage_memory,
    workers_from_scheduler,
)
from dask_infer.workflows.preprocessing import preprocess_record, preprocess_spec
from dask_infer.workflows.progress_page import RunBoard
from dask_infer.workflows.rebalance import Rebalance, Rebalancer, Reshare
from dask_infer.workflows.recovery import PipelineGuard
from dask_infer.workflows.report import RunRecorder, report_run
from dask_infer.workflows.stages import RuntimeSpec
from dask_infer.workflows.summary import RunSummary, gpu_summary, stage_summary, write_summary
from dask_infer.workflows.transfer import transfer_seconds_per_byte

__all__ = ["RUN_ATTR", "clamped_top_k", "output_shapes", "run_config"]

RUN_ATTR = "dask_infer_run"
"""Output attr recording what the results depend on (input, model, weights hash, options)."""


@dataclass(frozen=True)
class _Prepared:
    """What a run knows before any cluster: the images, the model, its cut and compression."""

    source: ImageSource
    loaded: LoadedModel
    plan: StagePlan | None
    compression: dict[str, Any] | None
    fingerprint: dict[str, Any]
    resumed: OutputTarget | None = None
    """The incomplete output a resume continues."""
    done: frozenset[int] = frozenset()
    """Chunks that output's manifest records as written."""
    filled: tuple[tuple[int, int], ...] = ()
    """``(start, stop)`` ranges of images in absent input chunks, read as the fill value."""
    shapes: OutputShapes = OutputShapes(())
    """Per-image shapes of the model's output and of its feature layer."""
    preprocess: PreprocessSpec | None = None
    """What turns the stored images into the model's input."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one image as the model receives it."""
        if self.preprocess is not None:
            return self.preprocess.input_shape
        return (3, self.loaded.input_size, self.loaded.input_size)

    @property
    def cuts(self) -> tuple[str, ...]:
        return tuple(self.plan.cut_points) if self.plan is not None else ()


@dataclass(frozen=True)
class _Layout:
    """Where the work goes: the placement, the chunks, and the cut they run with."""

    placement: Placement
    chunks: Chunks
    prepared: _Prepared
    labelled: bool
    """Whether the cluster labels its device workers (only they hold stages)."""


def _gpu(config: RunConfig) -> bool:
    return cuda_device_count() > 0 and config.device != "cpu"


def _check_compression(
    config: RunConfig, loaded: LoadedModel, cuts: tuple[str, ...]
) -> dict[str, Any] | None:
    """Refuse a plan that cannot be applied to these stages here; the plan as a dict."""
    if config.compress is None:
        return None
    if is_auto(config.compress):
        # Chosen on each worker; what was chosen and measured is in the run summary.
        return {"auto": {"min_agreement": auto_bound(config.compress)}}
    plan = CompressionPlan.coerce(config.compress)
    device = torch.device("cuda" if _gpu(config) else "cpu")
    stages = split_model(loaded.module, list(cuts)) if cuts else [loaded.module]
    for index, stage in enumerate(stages):
        check_recipe(
            stage, plan.recipe_for(index), device=device, has_calibration=True, label=f"stage {index}"
        )
    return plan.to_dict()


def _prepare(config: RunConfig, say: Callable[[str], None]) -> _Prepared:
    """Everything checked before a cluster starts: bad input fails here, in one line."""
    source, missing = open_input(config)
    if missing.chunks:
        say(
            f"warning: {missing.describe()}; reading them as the fill value {missing.fill_value!r} "
            "(missing_chunks='fill'); the output's 'filled' coordinate marks those images"
        )
    loaded = checked_model(config, say)
    preprocessing = preprocess_spec(config, loaded, source)
    plan = None
    if config.stages > 1:
        plan = partition_model(
            loaded.module,
            config.stages,
            balance=config.balance,
            sample=(1, *preprocessing.input_shape),
            name=loaded.name,
        ).plan
        say(format_plan(plan))
    cuts = tuple(plan.cut_points) if plan is not None else ()
    shapes = output_shapes(config, loaded, cuts, preprocessing.input_shape)
    prepared = _Prepared(
        source,
        loaded,
        plan,
        _check_compression(config, loaded, cuts),
        {**_fingerprint(config, source, loaded), **preprocess_record(config, preprocessing)},
        filled=missing.image_ranges,
        shapes=shapes,
        preprocess=preprocessing,
    )
    return _resumable(config, prepared, say) if config.resume else prepared


def output_shapes(
    config: RunConfig, loaded: LoadedModel, cuts: tuple[str, ...], input_shape: tuple[int, int, int]
) -> OutputShapes:
    """What the model gives per image (and its feature layer), checked against the asked outputs."""
    if config.feature_layer is not None and config.compress is not None:
        if is_auto(config.compress):
            raise CompressionError(
                f"feature_layer={config.feature_layer!r} cannot be read from stages --compress auto "
                "may compile; give a recipe such as bf16 with features"
            )
        plan = CompressionPlan.coerce(config.compress)
        check_feature_compression(plan, len(cuts) + 1, config.feature_layer)
    return probe_outputs(
        loaded.module,
        (1, *input_shape),
        activation=config.activation,
        feature_layer=config.feature_layer,
        cut_points=cuts,
        label=loaded.name,
    )


def _fingerprint(config: RunConfig, source: ImageSource, loaded: LoadedModel) -> dict[str, Any]:
    """What a run's results depend on: a resume must match it exactly to continue an output."""
    digest = file_sha256(loaded.weights)
    return {
        "input": normalise_location(config.input),
        "variable": source.variable,
        "images": source.n_images,
        "model": loaded.source.ref if loaded.source is not None else loaded.name,
        "model_kwargs": dict(loaded.source.kwargs or {}) or None if loaded.source is not None else None,
        "model_sha256": loaded.source.digest if loaded.source is not None else None,
        "weights_sha256": digest,
        "num_classes": loaded.num_classes,
        "input_size": loaded.input_size,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "compress": config.compress,
        "outputs": list(config.outputs),
        "top_k": min(config.top_k, loaded.num_classes),
        # Recorded only when not the default, so outputs written before these options still resume.
        **({"activation": config.activation} if config.activation != "softmax" else {}),
        **({"feature_layer": config.feature_layer} if config.feature_layer is not None else {}),
    }


def _resumable(config: RunConfig, prepared: _Prepared, say: Callable[[str], None]) -> _Prepared:
    """The incomplete output to continue, checked to come from the same input, model and options."""
    target, attrs = open_output(config.output, storage_options=config.storage_options)
    recorded = json.loads(attrs.get(RUN_ATTR, "{}"))
    differ = [k for k in prepared.fingerprint if recorded.get(k) != prepared.fingerprint[k]]
    if differ:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} then, {prepared.fingerprint[k]!r} now" for k in differ)
        raise InputError(
            f"cannot resume {config.output!r}: it was written with other {', '.join(differ)} ({shown}); "
            "resume with the same options, or start again with --overwrite"
        )
    if config.chunk_size is not None and config.chunk_size != target.chunk:
        raise InputError(
            f"cannot resume {config.output!r} with chunk_size={config.chunk_size}: it is written in "
            f"chunks of {target.chunk}; leave chunk_size out to resume"
        )
    done = frozenset(done_chunks(target))
    say(f"resuming {config.output}: {len(done)} chunk(s) of {target.chunk} images already written")
    return replace(prepared, resumed=target, done=done)


@contextlib.contextmanager
def _connected(config: RunConfig, client: Client | None) -> Iterator[tuple[Client, ClusterChoice | None]]:
    """The caller's client, or one to ``config``'s scheduler or a new local cluster (closed after)."""
    if client is not None:
        with worker_deaths(client, model=model_label(config.model)):
            yield client, None
        return
    n_workers = config.n_workers
    if n_workers is None and config.scheduler is None and config.placement in ("pipeline", "hybrid"):
        n_workers = config.stages * (config.replicas or 1)
    own, choice = make_client(
        scheduler=config.scheduler,
        scheduler_file=config.scheduler_file,
        device=config.device,
        n_workers=n_workers,
        threads_per_worker=config.threads_per_worker,
        memory_limit=config.memory_limit,
        tls_ca_file=config.tls_ca_file,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
    )
    try:
        with worker_deaths(own, model=model_label(config.model), memory_limit=config.memory_limit):
            yield own, choice
    finally:
        cluster = own.cluster
        own.close()
        if cluster is not None:
            cluster.close()


def _partition_here(
    model: str | ModelSource,
    weights: str | None,
    num_classes: int,
    stages: int,
    sample: tuple[int, ...],
    threads: int | None,
    precision: str = "fp32",
    channels_last: bool = False,
    transfer_s_per_byte: float = 0.0,
    fused: bool = False,
    share_boundary: float | None = None,
) -> dict[str, Any]:
    """Task body: partition the model by time as this worker runs it.

    ``transfer_s_per_byte`` charges each cut's activation to the stages beside it;
    ``fused`` balances the stages as compiled code runs them (see ``partition_model``).

    With ``precision`` (``bf16``/``fp16``) and ``channels_last``, the model is profiled in
    the dtype and memory format its compressed stages compute in: layers' relative costs
    change with both, and a cut balanced in fp32 can leave bf16 stages far apart. Where
    that profile fails, the fp32 one is taken. ``threads`` is capped at the cores this
    process may use, as the worker's model is (``ModelRuntime.setup``).

    Costs this worker measured for an earlier run of the same model, batch and threads
    are reused (``partition_model(..., reuse_profile=True)``); the returned plan's dict
    then carries ``"reused_profile": True``.
    """
    if threads is not None:
        threads = max(1, min(threads, usable_cores()))
    module = build_model(model, weights=weights, num_classes=num_classes).module
    before = profile_memo.thread_hits()

    def plan_of(net: torch.nn.Module, x: torch.Tensor | tuple[int, ...]) -> StagePlan:
        return partition_model(
            net,
            stages,
            balance="time",
            sample=x,
            name=str(model),
            repeats=3,
            threads=threads,
            transfer_s_per_byte=transfer_s_per_byte,
            fused=fused,
            share_boundary=share_boundary,
            reuse_profile=True,
        ).plan

    def found(plan: StagePlan) -> dict[str, Any]:
        return {**plan.to_dict(), "reused_profile": profile_memo.thread_hits() > before}

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None or channels_last:
        x = torch.zeros(sample, dtype=dtype or torch.float32)
        cast = module.to(dtype) if dtype is not None else module
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
            cast = cast.to(memory_format=torch.channels_last)
        try:
            return found(replace(plan_of(cast, x), input_shape=tuple(sample)))
        except Exception:  # a layer without a kernel for that dtype here: balance by fp32 times
            module = build_model(model, weights=weights, num_classes=num_classes).module
    return found(plan_of(module, sample))


SHARE_BOUNDARY = 1.03
"""A two-stage pipeline of compiled stages whose best single cut leaves them further apart
than this shares the block around the balance between its two workers (see
``partition_model(..., share_boundary=)``)."""


def _may_share_boundary(compress: Any, placement: Placement) -> bool:
    """Whether a pipeline may share a boundary stage: 2 stages on 2 workers, one recipe, compiled,
    not int8.

    Compiled stages are where single cuts fall short: the profile prices them fused, and
    ResNet-50's best compiled cut leaves 53.1% of the work on one stage. One recipe for
    every stage, since the shared stage is a third one. Not int8: its stages are profiled
    in fp32, which cannot say how uneven an int8 cut is, and a third stage costs a boundary
    more. ResNet-50 int8+compile on two one-thread workers (2 cores): the shared stage's
    measured share went to 0-9%, and by turns the single cut ran 0.77x data-parallel
    (median of 3 rounds; its model threads' CPU time 5.1-5.4 s for 256 images) against
    0.69x shared (5.3-6.6 s).
    """
    if not placement.two_workers_one_each or not _profiled_fused(compress, 3):
        return False
    plan = CompressionPlan.coerce(compress)
    recipes = {plan.recipe_for(i) for i in range(3)}
    return len(recipes) == 1 and not next(iter(recipes)).quantize


def _profiled_fused(compress: Any, stages: int) -> bool:
    """Whether every stage of ``compress`` is compiled, so the profile balances fused times."""
    if compress is None or is_auto(compress):
        return False
    plan = CompressionPlan.coerce(compress)
    return all(plan.recipe_for(i).compile for i in range(stages))


def _profiled_as(compress: Any, stages: int) -> tuple[str, bool]:
    """The precision and memory format every stage of ``compress`` computes in, if they all agree
    and are not int8; else fp32 (no compression, ``auto``, or stages that differ)."""
    if compress is None or is_auto(compress):
        return "fp32", False
    plan = CompressionPlan.coerce(compress)
    recipes = {plan.recipe_for(i) for i in range(stages)}
    if len({(r.precision, r.channels_last, r.quantize) for r in recipes}) != 1:
        return "fp32", False
    recipe = next(iter(recipes))
    return ("fp32", False) if recipe.quantize else (recipe.precision, recipe.channels_last)


def _boundary_width(compress: Any, stages: int) -> float:
    """Bytes a boundary passes per byte of the profile's activation: 1/4 when every stage is
    int8 (uint8 between them, measured as fp32), else 1."""
    if compress is None or is_auto(compress):
        return 1.0
    plan = CompressionPlan.coerce(compress)
    return 0.25 if all(plan.recipe_for(i).quantize == "int8" for i in range(stages)) else 1.0


def _profile_on(
    client: Client,
    worker: str,
    loaded: LoadedModel,
    stages: int,
    batch: int,
    threads: int,
    input_shape: tuple[int, int, int],
    compress: Any = None,
    transfer_s_per_byte: float = 0.0,
    share_boundary: float | None = None,
) -> tuple[StagePlan, bool]:
    """The time-balanced plan measured on ``worker``, with its torch threads and the run's batch,
    and whether the worker reused costs it had measured for an earlier run.

    ``transfer_s_per_byte`` (measured between two stage workers) is split between the two
    stages beside each cut: the sender's half and the receiver's. ``share_boundary``: as
    for ``partition_model``.

    Stage times depend on the threads and batch size they run with (early layers use
    threads better than late ones), so a profile taken on the client, with all of its
    machine's threads and batch 1, can cut a pipeline of one-thread workers far from
    balance.
    """
    future: Future = client.submit(
        _partition_here,
        loaded.source or loaded.name,
        loaded.weights,
        loaded.num_classes,
        stages,
        (batch, *input_shape),
        threads,
        *_profiled_as(compress, stages),
        transfer_s_per_byte / 2 * _boundary_width(compress, stages),
        _profiled_fused(compress, stages),
        share_boundary,
        workers=[worker],
        pure=False,
        key=f"{group_name('profile', loaded.name)}-{uuid.uuid4().hex[:8]}",
    )
    found = dict(future.result())
    reused = bool(found.pop("reused_profile", False))
    return StagePlan.from_dict(found), reused


def _smallest_memory(info: dict[str, Any]) -> tuple[int, int]:
    """The smallest worker ``memory_limit`` (0: none set) and what that worker's process uses now."""
    limited = [r for r in info.values() if int(r.get("memory_limit") or 0)]
    if not limited:
        return 0, 0
    record = min(limited, key=lambda r: int(r["memory_limit"]))
    return int(record["memory_limit"]), int((record.get("metrics") or {}).get("memory") or 0)


def _chunks(
    config: RunConfig,
    prepared: _Prepared,
    placement: Placement,
    workers: int,
    memory: tuple[int, int],
    say: Callable[[str], None],
) -> Chunks:
    """Images per task: as asked, or from the model's cost, the decoded image size and the workers' memory.

    ``memory`` is the smallest worker ``memory_limit`` (0 when none is set) and the memory
    that worker's process uses already.
    """
    source, loaded = prepared.source, prepared.loaded
    if prepared.resumed is not None:
        return split_chunks(source.n_images, source.storage_chunk, target=prepared.resumed.chunk, exact=True)
    if config.chunk_size is not None:
        if config.chunk_size % source.storage_chunk:
            say(
                f"chunk_size={config.chunk_size} splits the input's storage chunks of {source.storage_chunk} "
                f"images, so some are decoded more than once; a multiple of {source.storage_chunk} reads "
                "each once"
            )
        return split_chunks(source.n_images, source.storage_chunk, target=config.chunk_size, exact=True)
    gpu = _gpu(config)
    flops, activations = forward_cost(loaded.module, torch.zeros(1, *prepared.input_shape))
    batch = config.batch_size or default_batch_size(gpu)
    weights = sum(t.numel() * t.element_size() for t in loaded.module.state_dict().values())
    target = chunk_target(
        flops,
        source.bytes_per_image,
        gpu=gpu,
        memory_limit=memory[0],
        model_bytes=0 if gpu else weights + batch * activations,
        worker_bytes=memory[1],
    )
    return split_chunks(
        source.n_images,
        source.storage_chunk,
        target=target,
        min_tasks=max(2 * workers, min_chunks(placement)),
    )


def _lay_out(
    config: RunConfig,
    client: Client,
    prepared: _Prepared,
    choice: ClusterChoice | None,
    say: Callable[[str], None],
) -> _Layout:
    """Placement and chunks; a CPU pipeline balanced by time is measured, re-placed and re-checked here."""
    info = scheduler_workers(client)
    if not info:
        raise DaskInferError(f"the Dask cluster at {client.scheduler_info()['address']} has no workers")
    workers = _workers(client, config)
    batch = config.batch_size or default_batch_size(_gpu(config))
    loaded = prepared.loaded
    placement = choose_placement(
        config.placement,
        prepared.plan,
        workers,
        replicas=config.replicas,
        batch_size=batch,
        model=loaded.name,
    )
    chunks = _chunks(config, prepared, placement, len(info), _smallest_memory(info), say)
    plan = prepared.plan
    if plan is not None and placement.pipelined and config.balance == "time" and not _gpu(config):
        worker = placement.stage_workers(0)[0]
        threads = (choice.torch_threads if choice else None) or max(1, info[worker]["nthreads"])
        moving = transfer_seconds_per_byte(client, worker, placement.stage_workers(1)[0])
        if moving:
            say(f"activations between stage workers: {1e9 * moving:.2f} ms per MB, measured")
        profiled, reused = _profile_on(
            client,
            worker,
            loaded,
            plan.num_stages,
            min(batch, chunks.size),
            threads,
            prepared.input_shape,
            config.compress,
            moving,
            SHARE_BOUNDARY if _may_share_boundary(config.compress, placement) else None,
        )
        how = "costs it measured for an earlier run" if reused else "measured"
        say(f"re-profiled on {worker} ({how}):\n" + format_plan(profiled))
        placement = share_boundary(placement, profiled, workers, batch_size=batch)
        compression = prepared.compression
        if profiled.cut_points != plan.cut_points:
            compression = _check_compression(config, loaded, tuple(profiled.cut_points))
        prepared = replace(prepared, plan=profiled, compression=compression)
    say(placement.describe())
    labelled = any(float((r.get("resources") or {}).get(DEVICE_RESOURCE, 0)) > 0 for r in info.values())
    return _Layout(placement, chunks, prepared, labelled)


def runtime_spec(
    config: RunConfig,
    loaded: LoadedModel,
    preprocess: PreprocessSpec | None,
    shapes: OutputShapes,
    **placed: Any,
) -> RuntimeSpec:
    """What every worker needs to build the model as ``config`` says; ``placed`` adds the run's layout.

    A run adds its cuts, stage map, calibration source and thread count; a lazy
    ``predict`` needs none of them.
    """
    return RuntimeSpec(
        model=loaded.source or loaded.name,
        weights=loaded.weights,
        num_classes=loaded.num_classes,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        preprocess=preprocess,
        outputs=config.outputs,
        top_k=clamped_top_k(config, shapes),
        activation=config.activation,
        feature_layer=config.feature_layer,
        batch_size=config.batch_size,
        device=config.device,
        compress=config.compress,
        **placed,
    )


def _runtime_spec(config: RunConfig, layout: _Layout, choice: ClusterChoice | None) -> RuntimeSpec:
    prepared = layout.prepared
    return runtime_spec(
        config,
        prepared.loaded,
        prepared.preprocess,
        prepared.shapes,
        torch_threads=choice.torch_threads if choice else None,
        cut_points=prepared.cuts,
        calibration=prepared.source,
        calibration_images=config.calibration_images,
        stage_map=tuple(layout.placement.stages_on().items()) if layout.placement.pipelined else (),
        device_resource=DEVICE_RESOURCE if layout.labelled else None,
        warmup_images=layout.chunks.size,
    )


def clamped_top_k(config: RunConfig, shapes: OutputShapes) -> int:
    """``top_k``, at most the categories the model scores."""
    return min(config.top_k, shapes.result[0]) if len(shapes.result) == 1 else config.top_k


def _class_names(loaded: LoadedModel, source: ImageSource) -> tuple[str, ...] | None:
    if loaded.class_names is not None:
        return loaded.class_names
    if source.class_names is not None and len(source.class_names) == loaded.num_classes:
        return source.class_names
    return None


def _create_output(config: RunConfig, layout: _Layout, spec: RuntimeSpec) -> OutputTarget:
    source, loaded = layout.prepared.source, layout.prepared.loaded
    if layout.prepared.resumed is not None:
        return layout.prepared.resumed
    return create_output(
        config.output,
        n_images=source.n_images,
        result_shape=layout.prepared.shapes.result,
        activation=config.activation,
        feature_size=layout.prepared.shapes.features,
        top_k=spec.top_k,
        chunk=layout.chunks.size,
        outputs=config.outputs,
        image_coords=image_coords(source),
        class_names=_class_names(loaded, source),
        attrs={"dask_infer_complete": False, RUN_ATTR: layout.prepared.fingerprint},
        overwrite=config.overwrite,
        storage_options=config.storage_options,
        filled=layout.prepared.filled,
    )


def _workers(client: Client, config: RunConfig) -> list[WorkerInfo]:
    """The cluster's workers as placement sees them: memory limits, device memory, device labels."""
    info = scheduler_workers(client)
    memory = client.run(device_memory, config.device) if config.device != "cpu" else {}
    return workers_from_scheduler(info, memory)


def _guard(
    client: Client,
    config: RunConfig,
    layout: _Layout,
    output: OutputTarget,
    run: Execution,
    rebalancer: Rebalancer | None,
    say: Callable[[str], None],
) -> PipelineGuard:
    """What re-places a pipeline's stages when its workers change, with the run's plan and output."""
    plan = layout.prepared.plan
    batch = config.batch_size or default_batch_size(_gpu(config))

    def times() -> tuple[float, ...]:
        record = rebalancer.record if rebalancer is not None else None
        if isinstance(record, Reshare):
            return record.measured  # a shared stage keeps its cuts
        if record is not None and record.recut and tuple(run.spec.cut_points) == record.cuts_after:
            return record.predicted_after
        if plan is not None and tuple(plan.cut_points) == tuple(run.spec.cut_points):
            return tuple(s.time_s for s in plan.stages)
        return (1.0,) * run.spec.num_stages

    def needs() -> tuple[int, ...] | None:
        if plan is not None and tuple(plan.cut_points) == tuple(run.spec.cut_points):
            return stage_memory(plan, batch)
        return None

    return PipelineGuard(
        client,
        run,
        workers=lambda: _workers(client, config),
        times=times,
        written=lambda: done_chunks(output),
        say=say,
        needs=needs,
        batch_size=batch,
        on_change=lambda: rebalancer.stop("the stages were placed again") if rebalancer is not None else None,
    )


def _execute(
    client: Client,
    config: RunConfig,
    layout: _Layout,
    output: OutputTarget,
    run: Execution,
    say: Callable[[str], None],
    recorder: RunRecorder | None = None,
    dashboard: str | None = None,
) -> tuple[float, Rebalance | Reshare | None]:
    """Feed every chunk through the current runtime; the wall time and what a re-cut decided.

    ``recorder``, when given, records each chunk's times and samples the workers' memory.
    The run is counted on the dashboard's progress page (:mod:`.progress_page`).
    """
    source, label, chunks = layout.prepared.source, layout.prepared.loaded.name, layout.chunks
    every = len(scheduler_workers(client))

    def submit(indices: list[int]) -> list[Future]:
        placement = run.placement
        if placement.pipelined:
            return submit_pipeline(
                client, source, output, run.current, chunks, placement, label=label, indices=indices
            )
        return submit_chunks(
            client,
            source,
            output,
            run.current,
            chunks,
            label=label,
            indices=indices,
            workers=None if len(placement.workers) == every else placement.workers,
        )

    todo = [i for i in range(len(chunks.bounds)) if i not in layout.prepared.done]
    rebalancer = None
    if config.rebalance is not None:
        batch = min(config.batch_size or default_batch_size(False), chunks.size)
        rebalancer = Rebalancer(
            client, run, config.rebalance, len(todo), batch, say, chunk_images=chunks.size
        )
    guard = _guard(client, config, layout, output, run, rebalancer, say) if run.placement.pipelined else None
    pauses = PauseReporter(client, say)

    def check() -> None:
        if guard is not None:
            guard.check()
        pauses.check()
        if recorder is not None:
            recorder.check()

    start = run.last_start = time.perf_counter()
    written = source.n_images - sum(chunks.bounds[i][1] - chunks.bounds[i][0] for i in todo)
    bar_options = {"unit": "img", "disable": not config.progress, "desc": label, "leave": True}
    board = RunBoard(
        client, label=label, chunks=len(todo), images=source.n_images - written, say=say, dashboard=dashboard
    )
    status = "failed"
    with tqdm(total=source.n_images, initial=written, **bar_options) as bar:
        count = bar.update if recorder is None else recorder.on_done(bar.update)
        try:
            feed(
                run.placement,
                todo,
                board.watch(submit if recorder is None else recorder.watch(submit)),
                progress=config.progress,
                on_done=lambda i: count(chunks.bounds[i][1] - chunks.bounds[i][0]),
                after_write=rebalancer.after_write if rebalancer is not None else None,
                check=check,
                recover=guard.recover if guard is not None else None,
            )
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            board.finish(status)
    run.recoveries = [r.to_dict() for r in guard.records] if guard is not None else []
    return time.perf_counter() - start, rebalancer.record if rebalancer is not None else None


def _summarise(
    client: Client,
    config: RunConfig,
    layout: _Layout,
    run: Execution,
    seconds: float,
    rebalance: Rebalance | Reshare | None,
    choice: ClusterChoice | None,
    output: OutputTarget,
    dashboard: str | None,
) -> RunSummary:
    placement, done = run.placement, layout.prepared.done
    stats = runtime_stats(client, run.current)
    if isinstance(rebalance, Rebalance) and rebalance.recut:
        rebalance = replace(rebalance, measured_after=seconds_per_image(stats, placement.num_stages))
    images = sum(b - a for i, (a, b) in enumerate(layout.chunks.bounds) if i not in done)
    return RunSummary(
        images=images,
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
        output=config.output,
        model=layout.prepared.loaded.name,
        pretrained=layout.prepared.loaded.pretrained,
        chunks=len(layout.chunks.bounds),
        chunk_size=layout.chunks.size,
        workers=len(scheduler_workers(client)),
        model_loads=run.loads,
        reused_loads=run.reused,
        cluster=choice.describe() if choice else f"scheduler {client.scheduler_info()['address']}",
        dashboard=dashboard,
        placement=placement.to_dict(),
        loaded_stages={address: s["held_stages"] for address, s in sorted(stats.items())},
        stage_stats=stage_summary(stats, time.perf_counter() - run.last_start, placement.num_stages),
        gpus=gpu_summary(stats),
        rebalance=rebalance.to_dict() if rebalance else None,
        skipped_chunks=len(done),
        invalid_images=invalid_images(output),
        filled_images=sum(stop - start for start, stop in layout.prepared.filled),
        recoveries=run.recoveries,
        compression_choices={
            a: s["auto_compression"] for a, s in sorted(stats.items()) if s["auto_compression"]
        },
    )


def _finalize(config: RunConfig, output: OutputTarget, layout: _Layout, summary: RunSummary) -> None:
    prepared = layout.prepared
    loaded = prepared.loaded
    finalize_output(
        output,
        {
            "dask_infer_complete": True,
            "dask_infer_version": __version__,
            "model": loaded.name,
            "model_source": loaded.source.to_dict() if loaded.source is not None else {},
            "weights": loaded.weights,
            "pretrained": loaded.pretrained,
            "input_size": prepared.input_shape[-1],
            "normalize_mean": list(prepared.preprocess.mean if prepared.preprocess else loaded.mean),
            "normalize_std": list(prepared.preprocess.std if prepared.preprocess else loaded.std),
            "preprocess": prepared.preprocess.describe() if prepared.preprocess else {},
            "source": config.input,
            "source_variable": prepared.source.variable,
            "config": config.to_dict(),
            "stage_plan": prepared.plan.to_dict() if prepared.plan else {},
            "placement": summary.placement,
            "rebalance": summary.rebalance or {},
            "compression": prepared.compression or {},
            "run_summary": summary.to_dict(),
            "dask_infer_invalid_images": summary.invalid_images,
        },
    )
    if config.summary:
        write_summary(config.summary, summary.to_dict())


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
    # Workers may run elsewhere: they must read and write what the user named here.
    config = config.replace(input=absolute_location(config.input), output=absolute_location(config.output))
    check_worker_environment()
    if config.tile is not None:
        from dask_infer.workflows.tiled import run_tiled

        return run_tiled(config, client=client, echo=echo)
    prepared = _prepare(config, say)
    with _connected(config, client) as (client, choice):
        dashboard = client.dashboard_link
        say(f"dashboard: {dashboard}")
        layout = _lay_out(config, client, prepared, choice, say)
        spec = _runtime_spec(config, layout, choice)
        output = _create_output(config, layout, spec)
        say(f"loading {layout.prepared.loaded.name} on {len(layout.placement.workers)} worker(s)")
        run = Execution(spec, layout.placement)
        try:
            with maybe_performance_report(client, config.report):
                run.register(client)
                if run.reused:
                    say(f"{run.reused} worker(s) took the stages an earlier run of this model left loaded")
                recorder = RunRecorder(client) if config.report else None
                seconds, rebalance = _execute(client, config, layout, output, run, say, recorder, dashboard)
            summary = _summarise(client, config, layout, run, seconds, rebalance, choice, output, dashboard)
            if config.report and recorder is not None:
                plan = layout.prepared.plan
                report_run(
                    config.report,
                    client,
                    run,
                    summary,
                    recorder,
                    config=config.to_dict(),
                    plan=plan.to_dict() if plan is not None else None,
                    rebalance=rebalance,
                )
            _finalize(config, output, layout, summary)
        finally:
            run.release(client)
    say(summary.format())
    if any(row["images"] for row in summary.stage_stats):
        say(summary.format_stages())
    return summary
