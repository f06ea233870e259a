"""Model registry, splitting a model into balanced sequential stages, and compressing them."""

from dask_infer.partition.balance import PartitionError, balance_partition, part_sums
from dask_infer.partition.compress import CompressedStage, compress_module, compress_stages
from dask_infer.partition.models import (
    LoadedModel,
    available_models,
    build_model,
    check_model_name,
    load_weights_file,
    model_defaults,
)
from dask_infer.partition.partitioner import Partition, build_stage, partition_model
from dask_infer.partition.plan import BALANCE_MODES, PlanError, StageInfo, StagePlan, format_plan
from dask_infer.partition.recipe import CompressionError, CompressionPlan, CompressionRecipe
from dask_infer.partition.split import candidate_cuts, run_stages, split_model

__all__ = [
    "BALANCE_MODES",
    "CompressedStage",
    "CompressionError",
    "CompressionPlan",
    "CompressionRecipe",
    "LoadedModel",
    "Partition",
    "PartitionError",
    "PlanError",
    "StageInfo",
    "StagePlan",
    "available_models",
    "balance_partition",
    "build_model",
    "build_stage",
    "candidate_cuts",
    "check_model_name",
    "compress_module",
    "compress_stages",
    "format_plan",
    "load_weights_file",
    "model_defaults",
    "part_sums",
    "partition_model",
    "run_stages",
    "split_model",
]
