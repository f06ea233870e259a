"""Splitting a model into balanced sequential stages; ``partition.compress`` compresses each one."""

from dask_infer.partition.balance import PartitionError, balance_partition, imbalance
from dask_infer.partition.partitioner import Partition, build_stage, partition_model
from dask_infer.partition.split import candidate_cuts, run_stages, split_model
from dask_infer.partition.stage_plan import PlanError, StageInfo, StagePlan, format_plan

__all__ = [
    "Partition",
    "PartitionError",
    "PlanError",
    "StageInfo",
    "StagePlan",
    "balance_partition",
    "build_stage",
    "candidate_cuts",
    "format_plan",
    "imbalance",
    "partition_model",
    "run_stages",
    "split_model",
]
