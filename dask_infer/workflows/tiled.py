"""Tiled runs: each image cut into tiles (with halos), tiles run as Dask tasks, results stitched in place.

:func:`run_tiled` is what :func:`~dask_infer.workflows.run.run_config` runs when ``tile``
is set. Per tile there are three tasks, as per chunk in an ordinary run: a read of the
tile's window (its core plus the halo, clipped at the image's border) straight from the
input store, which decodes only the storage chunks the window touches; the model on the
worker's :class:`~dask_infer.workflows.runtime.ModelRuntime`, in its compute thread; and
a write of the core's results into the output's region, followed by the tile's manifest
element. Tasks are submitted a bounded number at a time, so neither the client nor any
worker ever holds a whole image: an image of any size streams through.

A model returning (N, C, H, W) maps at its input's resolution gives per-pixel ``mask``
and ``logits``/``probabilities`` stitched from the tiles' cores; a classifier gives one
prediction per ``tile`` x ``tile`` window every ``stride`` pixels, a row of tiles per task.

With ``scale_factor``, the grid lies on each image resampled by it: a tile's read task
reads the input pixels its resampled window needs and resamples them there
(:mod:`dask_infer.tiles.resample`), so each resampled pixel is the same in every tile.
Before any task, :func:`~dask_infer.tiles.memory.check_tile_memory` refuses tiles one
batch of which cannot fit the workers' memory limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import torch
from distributed import Client, get_worker, wait
from tqdm.auto import tqdm

from dask_infer._version import __version__
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError, ModelError
from dask_infer.io.images import (
    ImageSource,
    _cached_array,
    image_coords,
)
from dask_infer.io.stores import normalise_location
from dask_infer.models import LoadedModel
from dask_infer.models.preprocess import PreprocessSpec
from dask_infer.models.tracing import running_modules
from dask_infer.models.weights import file_sha256
from dask_infer.options import default_batch_size
from dask_infer.tiles.coords import resampled_grid, spatial_grid
from dask_infer.tiles.field import auto_halo, field_cap, measure_field
from dask_infer.tiles.grid import Box, TileGrid, Window, dense_grid, sliding_grid
from dask_infer.tiles.memory import TileBatch, check_tile_memory, worker_memory_limit
from dask_infer.tiles.options import AUTO, DEFAULT_OUTPUTS, TILED_OUTPUTS
from dask_infer.tiles.pixels import PixelSteps
from dask_infer.tiles.resample import Resampling, resample_window
from dask_infer.tiles.results import TileWork
from dask_infer.tiles.store import TileTarget, TileTask, create_tiled_output, done_tiles, write_tile
from dask_infer.workflows.checks import checked_model, open_input
from dask_infer.workflows.cluster import cuda_device_count, scheduler_workers
from dask_infer.workflows.execution import runtime_stats
from dask_infer.workflows.graph import group_name
from dask_infer.workflows.pauses import PauseReporter
from dask_infer.workflows.placement import Placement, choose_placement
from dask_infer.workflows.preprocessing import preprocess_spec
from dask_infer.workflows.runtime import ModelRuntime, compute_executor
from dask_infer.workflows.slots import leave_worker_slot
from dask_infer.workflows.stages import RuntimeSpec
from dask_infer.workflows.summary import RunSummary
from dask_infer.workflows.tile_pipeline import (
    StageWorkerLost,
    TileStages,
    plan_tile_stages,
    stage_workers_check,
    submit_tile_stages,
)

__all__ = ["TILE_RUN_ATTR", "TiledPlan", "plan_tiles", "read_resampled", "read_window", "run_tiled"]

TILE_RUN_ATTR = "dask_infer_run"
"""Output attr recording what the results depend on; a resume must match it."""

_IN_FLIGHT_PER_THREAD = 4
"""Tile tasks submitted ahead per worker thread: enough to keep every model busy."""

_RECOVERIES = 3
"""Times a pipelined tiled run places its stages again after losing a stage worker, before it stops."""

_REJOIN_S = 10.0
"""Seconds a pipelined tiled run waits, after losing a stage worker, for as many workers again."""

_PROBE_SIDE = 256
"""Largest tile side the model's output is probed with."""

_FINGERPRINT_DEFAULTS: dict[str, Any] = {"logits_dtype": "float32", "resample": None}
"""What a fingerprint recorded before these keys existed meant by leaving them out."""

_DTYPE_SCALE = {"uint8": 255.0, "uint16": 65535.0}
"""What the built-in preprocessing divides integer pixels by, applied to resampled (float) pixels."""


@dataclass(frozen=True)
class TiledPlan:
    """What a tiled run decided before any cluster: the images, the model, the grid and the outputs."""

    source: ImageSource
    loaded: LoadedModel
    grid: TileGrid
    classes: int
    outputs: tuple[str, ...]
    preprocess: PreprocessSpec
    fingerprint: dict[str, Any]
    done: frozenset[TileTask] = frozenset()
    resampling: Resampling | None = None
    stages: TileStages | None = None
    """The model's cut, where ``stages`` is above one."""

    def index(self, task: TileTask) -> int:
        """Position of ``task`` in :attr:`tasks`."""
        cols = self.grid.cols if self.grid.dense else 1
        return (task.image * self.grid.rows + task.row) * cols + task.col

    @property
    def tasks(self) -> tuple[TileTask, ...]:
        """Every task of the run, image by image, row by row."""
        cols = self.grid.cols if self.grid.dense else 1
        return tuple(
            TileTask(i, r, c)
            for i in range(self.source.n_images)
            for r in range(self.grid.rows)
            for c in range(cols)
        )

    def read_box(self, task: TileTask) -> Box:
        """The pixels task ``task`` reads: its window, or its row's band of windows."""
        if self.grid.dense:
            return self.grid.window(task.row, task.col).read
        first, last = self.grid.window(task.row, 0), self.grid.window(task.row, self.grid.cols - 1)
        return Box(first.read.y0, first.read.y1, first.read.x0, last.read.x1)


def _tile_preprocess(
    config: RunConfig, loaded: LoadedModel, source: ImageSource, resampled: bool
) -> PreprocessSpec:
    """The run's preprocessing without resizing or cropping: pixels scaled and normalised only.

    Resampled pixels reach the model as float32 in the stored units, so they are divided
    by the scale their stored dtype would have had.
    """
    spec = preprocess_spec(config, loaded, source)
    scale = spec.scale
    if resampled and scale is None:
        scale = _DTYPE_SCALE.get(str(source.dtype))
    steps = PixelSteps(
        spec.mean,
        spec.std,
        normalize=spec.normalize,
        scale=scale,
        channels=spec.channels,
        expand=spec.bands is None,
    )
    return dataclasses.replace(spec, transform=steps)


def _probe(loaded: LoadedModel, channels: int, side: int) -> torch.Tensor:
    loaded.module.eval()
    with torch.inference_mode(), running_modules():
        out = loaded.module(torch.zeros(1, channels, side, side))
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"{loaded.name} returns {type(out).__name__}, not one tensor; wrap it in a module that returns "
            "the map (N, C, H, W) or scores (N, C) to write"
        )
    return out


def _outputs(config: RunConfig, dense: bool, label: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    if config.outputs == ("logits", "top_k"):  # RunConfig's default: what suits the model
        return DEFAULT_OUTPUTS if dense else ("logits", "probabilities")
    if not dense and "mask" in config.outputs:
        raise ModelError(
            f"{label} gives per-tile outputs of shape {shape}, not a map, so outputs 'mask' does not "
            "apply; write its scores per tile with --outputs logits,probabilities"
        )
    return config.outputs


def _halo(
    config: RunConfig, loaded: LoadedModel, channels: int, tile: int, say: Callable[[str], None]
) -> int:
    if config.halo not in (None, AUTO):
        return int(config.halo)
    cap = field_cap(tile)
    field = measure_field(loaded.module, channels, cap=cap)
    halo = auto_halo(field, tile)
    reach = f"beyond {cap} (capped at half the tile, at most 256)" if field.capped else str(field.radius)
    say(f"halo auto: {halo} px ({loaded.name} reaches {reach} px, output stride {field.stride})")
    if tile % field.stride:
        say(
            f"warning: tile={tile} is not a multiple of {loaded.name}'s output stride {field.stride}; tiles "
            f"may differ slightly from the whole image's map; use a multiple of {field.stride}"
        )
    return halo


def _fingerprint(
    config: RunConfig,
    source: ImageSource,
    loaded: LoadedModel,
    grid: TileGrid,
    outputs: tuple[str, ...],
    resampling: Resampling | None,
) -> dict[str, Any]:
    digest = file_sha256(loaded.weights)
    return {
        "input": normalise_location(config.input),
        "variable": source.variable,
        "images": source.n_images,
        "model": loaded.source.ref if loaded.source is not None else loaded.name,
        "weights_sha256": digest,
        "num_classes": loaded.num_classes,
        "outputs": list(outputs),
        "tile": grid.tile,
        "halo": grid.halo,
        "stride": grid.stride,
        "dense": grid.dense,
        "compress": config.compress,
        "logits_dtype": config.logits_dtype,
        "resample": None
        if resampling is None
        else {"scale_factor": config.scale_factor, "interpolation": resampling.mode},
    }


def _check_options(config: RunConfig) -> None:
    """Outputs and preprocessing a tiled run can honour."""
    tile = config.tile
    bad = [o for o in config.outputs if o not in TILED_OUTPUTS]
    # The default outputs become what suits the model (a mask, or tile scores) once it is built.
    if bad and config.outputs != RunConfig.outputs:
        raise DaskInferError(
            f"outputs={list(config.outputs)!r} with tile={tile}: tiled runs write "
            f"{', '.join(TILED_OUTPUTS)}; drop {', '.join(bad)}"
        )
    given = [n for n in ("resize", "crop", "transform") if getattr(config, n) is not None]
    if given:
        raise DaskInferError(
            f"{given[0]} given with tile={tile}: tiles go to the model at their own size, with the "
            f"image's pixels; leave --{given[0]} out"
        )


def plan_tiles(config: RunConfig, say: Callable[[str], None] = lambda _l: None) -> TiledPlan:
    """Everything a tiled run checks before a cluster: bad input fails here, in one line.

    Raises
    ------
    DaskInferError
        For a tile larger than the images, a stride or halo given to the wrong kind of
        model, ``mask`` asked of a model that gives no map, more stages than the model has
        cut points, or a resume that does not match.
    """
    assert config.tile is not None
    _check_options(config)
    source, missing = open_input(config)
    if missing.chunks:
        say(f"warning: {missing.describe()}; reading them as the fill value {missing.fill_value!r}")
    height, width, _ = source.image_shape
    tile = config.tile
    resampling = None
    if config.scale_factor != 1:
        resampling = Resampling.by(height, width, config.scale_factor, config.interpolation)
        height, width = resampling.out_height, resampling.out_width
        if tile > min(height, width):
            # Rounded up, so that the factor suggested does give images of a tile.
            least = math.ceil(1000 * tile / min(resampling.height, resampling.width)) / 1000
            raise InputError(
                f"scale_factor={config.scale_factor:g} leaves the images of {config.input!r} "
                f"{height}x{width} pixels, smaller than tile={tile}; give a scale factor of at least "
                f"{least:g} or a smaller tile"
            )
        say(
            f"scale factor {config.scale_factor:g}: images of {resampling.height}x{resampling.width} "
            f"resampled ({config.interpolation}) to {height}x{width} before tiling"
        )
    if tile > min(height, width):
        raise InputError(
            f"tile={tile} is larger than the images of {config.input!r} ({height}x{width} pixels); give a "
            f"tile of at most {min(height, width)}"
        )
    loaded = checked_model(config, say)
    preprocess = _tile_preprocess(config, loaded, source, resampling is not None)
    channels = preprocess.channels
    side = min(tile, _PROBE_SIDE)
    out = _probe(loaded, channels, side)
    shape = tuple(int(n) for n in out.shape[1:])
    dense = out.ndim == 4
    if dense and tuple(out.shape[-2:]) != (side, side):
        raise ModelError(
            f"{loaded.name} gives maps of {tuple(out.shape[-2:])} for tiles of {side}x{side}; tiled runs "
            "write maps at the input's resolution: make the model upsample its output to its input's size"
        )
    if not dense and out.ndim != 2:
        raise ModelError(
            f"{loaded.name} gives per-tile outputs of shape {shape}; tiled runs take maps (class, y, x) "
            "or scores (class,)"
        )
    outputs = _outputs(config, dense, loaded.name, shape)
    if dense:
        if config.stride is not None:
            raise DaskInferError(
                f"stride={config.stride} given, but {loaded.name} returns maps, whose tiles are stitched "
                "edge to edge with halos; leave --stride out"
            )
        grid = dense_grid(height, width, tile, _halo(config, loaded, channels, tile, say))
    else:
        if isinstance(config.halo, int) and config.halo:
            raise DaskInferError(
                f"halo={config.halo} given, but {loaded.name} gives one prediction per tile; leave --halo "
                "out, and overlap tiles with --stride"
            )
        grid = sliding_grid(height, width, tile, config.stride or tile)
    say(
        f"tiles: {grid.rows}x{grid.cols} per image of {height}x{width} (tile {tile}, "
        + (f"halo {grid.halo}" if dense else f"stride {grid.stride}")
        + f"); {grid.halo_overhead:.0%} extra pixels computed"
    )
    classes = shape[0]
    side_in = min(tile + 2 * grid.halo, height, width)
    preprocess = dataclasses.replace(preprocess, model_input=(channels, side_in, side_in))
    stages = plan_tile_stages(config, loaded, (channels, side_in, side_in), dense, say)
    plan = TiledPlan(
        source,
        loaded,
        grid,
        classes,
        outputs,
        preprocess,
        _fingerprint(config, source, loaded, grid, outputs, resampling),
        resampling=resampling,
        stages=stages,
    )
    return _resumable(config, plan, say) if config.resume else plan


def _resumable(config: RunConfig, plan: TiledPlan, say: Callable[[str], None]) -> TiledPlan:
    import zarr

    done = done_tiles(config.output, config.storage_options)
    attrs = dict(
        zarr.open_group(config.output, mode="r", storage_options=config.storage_options or None).attrs
    )
    recorded = json.loads(str(attrs.get(TILE_RUN_ATTR, "{}")))
    differ = [
        k for k in plan.fingerprint if recorded.get(k, _FINGERPRINT_DEFAULTS.get(k)) != plan.fingerprint[k]
    ]
    if differ:
        raise InputError(
            f"cannot resume {config.output!r}: it was written with other {', '.join(differ)}; resume with "
            "the same options, or start again with --overwrite"
        )
    say(f"resuming {config.output}: {len(done)} tile task(s) already written")
    return dataclasses.replace(plan, done=frozenset(done))


def read_window(source: ImageSource, image: int, box: Box) -> np.ndarray:
    """Pixels ``box`` of image ``image``, (1, y, x, channel), decoding only the chunks it touches."""
    arr = _cached_array(source.url, source.variable, json.dumps(source.storage_options, sort_keys=True))
    ys, xs = slice(box.y0, box.y1), slice(box.x0, box.x1)
    if source.layout == "NHWC":
        out = np.asarray(arr[image, ys, xs, :])
    elif source.layout == "NCHW":
        out = np.asarray(arr[image, :, ys, xs]).transpose(1, 2, 0)
    else:
        out = np.asarray(arr[image, ys, xs])[..., None]
    return np.ascontiguousarray(out[None])


def read_resampled(source: ImageSource, image: int, box: Box, resampling: Resampling) -> np.ndarray:
    """Pixels ``box`` of image ``image`` resampled, (1, y, x, channel) float32 in the stored units.

    Reads only the input pixels the resampled ``box`` is computed from.
    """
    region, wy, wx = resampling.weights(box)
    return resample_window(read_window(source, image, region), wy, wx)


def infer_tile(runtime: str, work: TileWork, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Task body, on the runtime's compute executor: the model on one task's pixels
    (``work.band``), each window's results, the worker's thread given back meanwhile."""
    leave_worker_slot()
    plugin: ModelRuntime = get_worker().plugins[runtime]  # type: ignore[assignment]
    with running_modules():
        return work.results(plugin.forward(work.model_input(pixels)))


def _tasks_of(plan: TiledPlan, task: TileTask) -> tuple[tuple[Window, ...], Box, tuple[int, int, int, int]]:
    grid = plan.grid
    if grid.dense:
        window = grid.window(task.row, task.col)
        core = window.core
        return (window,), window.read, (core.y0, core.y1, core.x0, core.x1)
    windows = tuple(grid.window(task.row, c) for c in range(grid.cols))
    return windows, plan.read_box(task), (0, 0, 0, 0)


def _submit(
    client: Client,
    plan: TiledPlan,
    target: TileTarget,
    runtime: str,
    tasks: list[TileTask],
    activation: str,
    token: str,
    logits_dtype: str = "float32",
    placement: Placement | None = None,
) -> list[Any]:
    """Read, infer (or stage) and write tasks of ``tasks``; the write futures."""
    futures = []
    for task in tasks:
        windows, band, core = _tasks_of(plan, task)
        work = TileWork(windows, band, plan.outputs, activation, plan.grid.dense, logits_dtype)
        suffix = f"{token}-{task.image}_{task.row}_{task.col}"
        if placement is not None and placement.pipelined:
            if plan.resampling is None:
                read: Callable[..., Any] = read_window
                args: tuple[Any, ...] = (plan.source, task.image, band)
            else:
                read, args = read_resampled, (plan.source, task.image, band, plan.resampling)
            result = submit_tile_stages(
                client,
                placement,
                runtime,
                group_name(plan.loaded.name),
                plan.index(task),
                suffix,
                read,
                args,
                work,
            )
            futures.append(
                client.submit(
                    write_tile,
                    target,
                    task,
                    core,
                    result,
                    key=f"write_tile-{suffix}",
                    priority=2 + placement.num_stages,
                )
            )
            continue
        if plan.resampling is None:
            pixels = client.submit(
                read_window, plan.source, task.image, band, key=f"read_tile-{suffix}", priority=0
            )
        else:
            pixels = client.submit(
                read_resampled,
                plan.source,
                task.image,
                band,
                plan.resampling,
                key=f"read_tile-{suffix}",
                priority=0,
            )
        with dask.annotate(executor=compute_executor(runtime)):
            result = client.submit(
                infer_tile,
                runtime,
                work,
                pixels,
                key=f"infer_tile-{suffix}",
                priority=1,
            )
        futures.append(
            client.submit(write_tile, target, task, core, result, key=f"write_tile-{suffix}", priority=2)
        )
    return futures


def _feed(
    submit: Callable[[list[TileTask]], list[Any]],
    todo: list[TileTask],
    ahead: int,
    on_done: Callable[[int], None],
    check: Callable[[], None],
) -> None:
    """Keep ``ahead`` tasks in flight until every one of ``todo`` is written; ``check`` about every second."""
    pending = iter(todo)
    flying = set(submit(_take(pending, ahead)))
    while flying:
        try:
            done, flying = wait(flying, timeout=1.0, return_when="FIRST_COMPLETED")
        except TimeoutError:  # none finished within the second
            done = set()
        for future in done:
            if future.status != "finished":
                future.result()  # raises the task's exception; a written tile's count is not fetched
            on_done(1)
        flying |= set(submit(_take(pending, len(done))))
        check()


def _take(items: Iterator[TileTask], n: int) -> list[TileTask]:
    out = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    return out


def _runtime_spec(
    config: RunConfig, plan: TiledPlan, threads: int | None, placement: Placement | None = None
) -> RuntimeSpec:
    loaded = plan.loaded
    stages = plan.stages
    return RuntimeSpec(
        model=loaded.source or loaded.name,
        weights=loaded.weights,
        num_classes=loaded.num_classes,
        input_size=loaded.input_size,
        mean=loaded.mean,
        std=loaded.std,
        preprocess=plan.preprocess,
        outputs=("logits",),
        top_k=1,
        activation=config.activation,
        batch_size=config.batch_size,
        device=config.device,
        torch_threads=threads,
        compress=config.compress,
        calibration=plan.source if config.compress is not None else None,
        calibration_images=config.calibration_images,
        warmup_images=1,
        cut_points=stages.plan.cut_points if stages is not None else (),
        resize_tail=stages.tail if stages is not None else None,
        stage_map=tuple(placement.stages_on().items())
        if placement is not None and placement.pipelined
        else (),
    )


def run_tiled(
    config: RunConfig, *, client: Client | None = None, echo: Callable[[str], None] | None = print
) -> RunSummary:
    """Run ``config`` (with ``tile`` set) tile by tile; see :func:`dask_infer.run` for the options."""
    from dask_infer.workflows.run import _connected

    say = echo or (lambda _line: None)
    plan = plan_tiles(config, say)
    source, grid = plan.source, plan.grid
    with _connected(config, client) as (client, choice):
        say(f"dashboard: {client.dashboard_link}")
        workers = scheduler_workers(client)
        check_tile_memory(_tile_batch(config, plan), worker_memory_limit(workers))
        spatial = spatial_grid(source)
        if plan.done or config.resume:
            target = TileTarget(config.output, plan.outputs, grid.dense, dict(config.storage_options))
        else:
            target = create_tiled_output(
                config.output,
                n_images=source.n_images,
                grid=grid,
                classes=plan.classes,
                outputs=plan.outputs,
                spatial=spatial if plan.resampling is None else resampled_grid(spatial, plan.resampling),
                image_coords=image_coords(source),
                class_names=plan.loaded.class_names,
                attrs={"dask_infer_complete": False, TILE_RUN_ATTR: plan.fingerprint},
                overwrite=config.overwrite,
                storage_options=config.storage_options,
                logits_dtype=config.logits_dtype,
            )
        batch = (
            1
            if grid.dense
            else min(config.batch_size or default_batch_size(config.device == "cuda"), grid.cols)
        )
        placement = _place(config, plan, client, batch, say)
        todo = [t for t in plan.tasks if t not in plan.done]
        tasks_to_run = len(todo)
        threads = sum(w["nthreads"] for w in scheduler_workers(client).values())
        loads, reused_loads, recoveries = 0, 0, 0
        start = time.perf_counter()
        bar = {"unit": "tile", "disable": not config.progress, "desc": plan.loaded.name, "leave": True}
        with tqdm(total=len(plan.tasks), initial=len(plan.tasks) - len(todo), **bar) as progress:
            while True:
                name = f"dask-infer-runtime-{uuid.uuid4().hex[:8]}"
                spec = _runtime_spec(config, plan, choice.torch_threads if choice else None, placement)
                say(f"loading {plan.loaded.name} on {len(scheduler_workers(client))} worker(s)")
                client.register_plugin(ModelRuntime(spec, name), name=name)
                try:
                    _feed(
                        _submitter(client, plan, target, name, config, placement),
                        todo,
                        max(2, _IN_FLIGHT_PER_THREAD * threads),
                        progress.update,
                        _checks(client, placement, say),
                    )
                    loaded, reused = _loads(client, name)
                    loads, reused_loads = loads + loaded, reused_loads + reused
                    break
                except StageWorkerLost as lost:
                    if recoveries >= _RECOVERIES or placement is None:
                        raise
                    recoveries += 1
                    todo = _after_loss(client, config, plan, placement, lost, progress, say)
                    try:
                        placement = _place(config, plan, client, batch, say)
                    except DaskInferError:
                        raise lost from None
                finally:
                    client.unregister_worker_plugin(name)
        seconds = time.perf_counter() - start
        summary = RunSummary(
            images=source.n_images,
            seconds=seconds,
            images_per_second=source.n_images / seconds if seconds > 0 else 0.0,
            output=config.output,
            model=plan.loaded.name,
            pretrained=plan.loaded.pretrained,
            chunks=tasks_to_run,
            chunk_size=1,
            workers=len(scheduler_workers(client)),
            model_loads=loads,
            reused_loads=reused_loads,
            cluster=choice.describe() if choice else f"scheduler {client.scheduler_info()['address']}",
            dashboard=client.dashboard_link,
            placement={
                **(placement.to_dict() if placement is not None else {"mode": "data"}),
                "kind": placement.mode if placement is not None else "data",
                "tiles": _tile_record(plan, seconds, tasks_to_run),
                "recoveries": recoveries,
            },
            skipped_chunks=len(plan.done),
        )
    _finalize(config, plan, target, summary)
    say(summary.format())
    say(_tile_line(plan, seconds, tasks_to_run))
    return summary


def _loads(client: Client, runtime: str) -> tuple[int, int]:
    """Times the workers loaded the runtime named ``runtime``, and of those, how many took kept stages."""
    stats = runtime_stats(client, runtime).values()
    return sum(int(s["loads"]) for s in stats), sum(bool(s.get("reused")) for s in stats)


def _place(
    config: RunConfig, plan: TiledPlan, client: Client, batch: int, say: Callable[[str], None]
) -> Placement | None:
    """The stages on the cluster's workers now (``None``: one stage, every worker holds the model).

    ``batch`` is the images a tile task runs at once: one window for a map, a row's tiles
    for a classifier.
    """
    if plan.stages is None:
        return None
    from dask_infer.workflows.run import _workers

    placement = choose_placement(
        config.placement,
        plan.stages.plan,
        _workers(client, config),
        replicas=config.replicas,
        batch_size=batch,
        model=plan.loaded.name,
    )
    say(placement.describe())
    return placement


def _submitter(
    client: Client,
    plan: TiledPlan,
    target: TileTarget,
    runtime: str,
    config: RunConfig,
    placement: Placement | None,
) -> Callable[[list[TileTask]], list[Any]]:
    """What submits a batch of tile tasks to ``runtime`` under ``placement``, with keys of their own."""
    token = uuid.uuid4().hex[:8]
    return lambda tasks: _submit(
        client, plan, target, runtime, tasks, config.activation, token, config.logits_dtype, placement
    )


def _checks(client: Client, placement: Placement | None, say: Callable[[str], None]) -> Callable[[], None]:
    """What the feed checks about every second: paused workers, and a pipeline's stage workers."""
    pauses = PauseReporter(client, say).check
    stages = stage_workers_check(client, placement) if placement is not None and placement.pipelined else None

    def check() -> None:
        pauses()
        if stages is not None:
            stages()

    return check


def _after_loss(
    client: Client,
    config: RunConfig,
    plan: TiledPlan,
    placement: Placement,
    lost: StageWorkerLost,
    progress: Any,
    say: Callable[[str], None],
) -> list[TileTask]:
    """The tile tasks left to run after a stage worker was lost, once the cluster had a moment to restart it.

    A nanny restarts a killed worker under a new address: up to ``_REJOIN_S`` seconds are
    given for the cluster to have as many workers again. Tiles are counted from the manifest,
    so a tile whose write landed is not run again.
    """
    with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
        client.wait_for_workers(len(placement.workers), timeout=_REJOIN_S)
    written = done_tiles(config.output, config.storage_options)
    todo = [t for t in plan.tasks if t not in written]
    progress.n = len(plan.tasks) - len(todo)
    progress.refresh()
    say(
        f"{lost.line}: {len(written)} of {len(plan.tasks)} tile task(s) written; placing the stages again "
        f"on the {len(scheduler_workers(client))} worker(s) there are"
    )
    return todo


def _tile_batch(config: RunConfig, plan: TiledPlan) -> TileBatch:
    """What one forward pass of ``plan`` holds: one tile for a map, up to a batch of a row's tiles."""
    grid, resampling = plan.grid, plan.resampling
    side = min(grid.tile + 2 * grid.halo, grid.height, grid.width)
    # The CPU's default batch, the smaller one: the estimate must stay a lower bound.
    batch = 1 if grid.dense else min(config.batch_size or default_batch_size(False), grid.cols)
    read = 0
    if resampling is not None:
        box = plan.read_box(plan.tasks[0])
        region = resampling.source(box)
        read = region.pixels * plan.source.image_shape[2] * np.dtype(plan.source.dtype).itemsize
    module = plan.loaded.module
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    stored = np.dtype(plan.source.dtype).itemsize
    return TileBatch(
        grid.tile,
        grid.halo,
        side,
        batch,
        plan.preprocess.channels,
        plan.classes,
        grid.dense,
        weight_bytes=weights,
        read_bytes=read,
        on_gpu=config.device == "cuda" or (config.device == "auto" and cuda_device_count() > 0),
        pixel_bytes=4 if resampling is not None else stored,
    )


def _tile_record(plan: TiledPlan, seconds: float, tasks: int) -> dict[str, Any]:
    grid = plan.grid
    tiles = tasks if grid.dense else tasks * grid.cols
    pixels = plan.source.n_images * grid.height * grid.width * tasks / max(1, len(plan.tasks))
    return {
        "tile": grid.tile,
        "halo": grid.halo,
        "stride": grid.stride,
        "dense": grid.dense,
        "rows": grid.rows,
        "cols": grid.cols,
        "tiles": tiles,
        "tiles_per_second": tiles / seconds if seconds > 0 else 0.0,
        "pixels_per_second": pixels / seconds if seconds > 0 else 0.0,
        "halo_overhead": grid.halo_overhead,
    }


def _tile_line(plan: TiledPlan, seconds: float, tasks: int) -> str:
    r = _tile_record(plan, seconds, tasks)
    return (
        f"{r['tiles']} tiles ({r['tiles_per_second']:.2f} tiles/s, "
        f"{r['pixels_per_second'] / 1e6:.2f} Mpixel/s), "
        f"halo overhead {r['halo_overhead']:.0%} extra pixels computed"
    )


def _finalize(config: RunConfig, plan: TiledPlan, target: TileTarget, summary: RunSummary) -> None:
    import zarr

    from dask_infer.io.outputs import quiet_zarr
    from dask_infer.workflows.summary import write_summary

    group = zarr.open_group(store=target.url, mode="r+", storage_options=config.storage_options or None)
    attrs: dict[str, Any] = {
        "dask_infer_complete": True,
        "dask_infer_version": __version__,
        "model": plan.loaded.name,
        "weights": plan.loaded.weights,
        "pretrained": plan.loaded.pretrained,
        "source": config.input,
        "source_variable": plan.source.variable,
        "tile": plan.grid.tile,
        "halo": plan.grid.halo,
        "stride": plan.grid.stride,
        "scale_factor": config.scale_factor,
        "logits_dtype": config.logits_dtype,
        "normalize_mean": list(plan.preprocess.mean),
        "normalize_std": list(plan.preprocess.std),
        "config": json.dumps(config.to_dict()),
        "run_summary": json.dumps(summary.to_dict()),
    }
    group.attrs.update(attrs)
    with quiet_zarr():
        zarr.consolidate_metadata(group.store)
    if config.summary:
        write_summary(config.summary, summary.to_dict())
