"""dask-infer: batch inference of PyTorch vision models over Zarr images, on Dask."""

from dask_infer._version import __version__
from dask_infer.api import run
from dask_infer.config import RunConfig
from dask_infer.errors import DaskInferError, InputError, ModelError
from dask_infer.evaluation import EvaluationReport, evaluate
from dask_infer.io import open_images, write_image_dataset, write_sample
from dask_infer.partition import (
    CompressionPlan,
    CompressionRecipe,
    StagePlan,
    compress_stages,
    format_plan,
    partition_model,
    split_model,
)
from dask_infer.workflows import RunSummary

__all__ = [
    "CompressionPlan",
    "CompressionRecipe",
    "DaskInferError",
    "EvaluationReport",
    "InputError",
    "ModelError",
    "RunConfig",
    "RunSummary",
    "StagePlan",
    "__version__",
    "compress_stages",
    "evaluate",
    "format_plan",
    "open_images",
    "partition_model",
    "run",
    "split_model",
    "write_image_dataset",
    "write_sample",
]
