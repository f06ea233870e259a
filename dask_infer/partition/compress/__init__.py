"""Compressing each stage by its recipe: precision, memory format, int8, pruning, compilation."""

from dask_infer.partition.compress.apply import (
    CompressedStage,
    check_recipe,
    compress_module,
    compress_stages,
)
from dask_infer.partition.compress.recipe import CompressionError, CompressionPlan, CompressionRecipe

__all__ = [
    "CompressedStage",
    "CompressionError",
    "CompressionPlan",
    "CompressionRecipe",
    "check_recipe",
    "compress_module",
    "compress_stages",
]
