"""Running inference on Dask: cluster, per-worker runtime, task graph, orchestration."""

from dask_infer.workflows.cluster import choose_local_cluster, make_client
from dask_infer.workflows.graph import plan_chunks
from dask_infer.workflows.preprocess import Preprocess
from dask_infer.workflows.run import RunSummary, run_config
from dask_infer.workflows.runtime import ModelRuntime, RuntimeSpec

__all__ = [
    "ModelRuntime",
    "Preprocess",
    "RunSummary",
    "RuntimeSpec",
    "choose_local_cluster",
    "make_client",
    "plan_chunks",
    "run_config",
]
