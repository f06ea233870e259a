"""Running inference on Dask: cluster, placement, per-worker runtime, task graph, feed, summary."""

from dask_infer.workflows.cluster import choose_local_cluster, make_client
from dask_infer.workflows.graph import Chunks, split_chunks
from dask_infer.workflows.placement import Placement, PlacementError, WorkerInfo, choose_placement
from dask_infer.workflows.run import run_config
from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from dask_infer.workflows.summary import RunSummary

__all__ = [
    "Chunks",
    "ModelRuntime",
    "Placement",
    "PlacementError",
    "RunSummary",
    "RuntimeSpec",
    "WorkerInfo",
    "choose_local_cluster",
    "choose_placement",
    "make_client",
    "run_config",
    "split_chunks",
]
