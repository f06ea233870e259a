"""Running inference on Dask: cluster, placement, per-worker runtime, task graph, monitoring."""

from dask_infer.workflows.cluster import choose_local_cluster, make_client
from dask_infer.workflows.graph import plan_chunks
from dask_infer.workflows.plan import Placement, PlacementError, WorkerInfo, plan_placement
from dask_infer.workflows.preprocess import Preprocess
from dask_infer.workflows.run import RunSummary, run_config
from dask_infer.workflows.runtime import ModelRuntime, RuntimeSpec

__all__ = [
    "ModelRuntime",
    "Placement",
    "PlacementError",
    "Preprocess",
    "RunSummary",
    "RuntimeSpec",
    "WorkerInfo",
    "choose_local_cluster",
    "make_client",
    "plan_chunks",
    "plan_placement",
    "run_config",
]
