"""What every run checks before a cluster starts: the scheduler named, the input, the outputs, the model.

A run over chunks and a tiled run open the input and load the model the same way, so a
bad value fails the same way, in one line, before any work.
"""

from __future__ import annotations

from collections.abc import Callable

from dask_infer.config import RunConfig
from dask_infer.io.images import ImageSource, MissingChunks, check_missing_chunks, describe_source
from dask_infer.io.outputs import check_output_location
from dask_infer.io.writable import check_run_targets
from dask_infer.models import LoadedModel, build_model
from dask_infer.workflows.cluster import check_scheduler

__all__ = ["checked_model", "open_input"]


def open_input(config: RunConfig) -> tuple[ImageSource, MissingChunks]:
    """The scheduler's address checked, the input described (no pixels read), its missing chunks found."""
    check_scheduler(
        config.scheduler,
        config.scheduler_file,
        tls_ca_file=config.tls_ca_file,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
    )
    source = describe_source(
        config.input,
        variable=config.variable,
        layout=config.layout,
        dims=config.dims,
        storage_options=config.storage_options,
    )
    return source, check_missing_chunks(source, config.missing_chunks)


def checked_model(config: RunConfig, say: Callable[[str], None]) -> LoadedModel:
    """The output and summary/report paths checked, then the model built (a warning without weights)."""
    check_output_location(
        config.input,
        config.output,
        overwrite=config.overwrite,
        resume=config.resume,
        storage_options=config.storage_options,
    )
    check_run_targets(config.output, summary=config.summary, report=config.report)
    loaded = build_model(
        config.model, weights=config.weights, num_classes=config.num_classes, model_kwargs=config.model_kwargs
    )
    if not loaded.pretrained:
        say(
            f"warning: no --weights given, so {loaded.name} is randomly initialised and its predictions "
            "are meaningless (weights are never downloaded; pass a local .pt/.pth/.safetensors file)"
        )
    return loaded
