"""dask-infer: batch inference of PyTorch vision models over Zarr images, on Dask.

Names are imported on first use, so ``dask-infer`` commands that need neither torch
nor distributed (``--help``, ``models``) start without importing them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dask_infer._version import __version__

if TYPE_CHECKING:
    from dask_infer.api import run as run
    from dask_infer.config import RunConfig as RunConfig
    from dask_infer.errors import DaskInferError as DaskInferError
    from dask_infer.errors import InputError as InputError
    from dask_infer.errors import ModelError as ModelError
    from dask_infer.evaluation import EvaluationReport as EvaluationReport
    from dask_infer.evaluation import evaluate as evaluate
    from dask_infer.io import open_images as open_images
    from dask_infer.io import write_image_dataset as write_image_dataset
    from dask_infer.io import write_sample as write_sample
    from dask_infer.io.outputs import open_results as open_results
    from dask_infer.partition import StagePlan as StagePlan
    from dask_infer.partition import format_plan as format_plan
    from dask_infer.partition import partition_model as partition_model
    from dask_infer.partition import split_model as split_model
    from dask_infer.partition.compress import CompressionPlan as CompressionPlan
    from dask_infer.partition.compress import CompressionRecipe as CompressionRecipe
    from dask_infer.partition.compress import compress_stages as compress_stages
    from dask_infer.workflows.lazy import predict as predict
    from dask_infer.workflows.summary import RunSummary as RunSummary

_HOME = {
    "CompressionPlan": "dask_infer.partition.compress",
    "CompressionRecipe": "dask_infer.partition.compress",
    "DaskInferError": "dask_infer.errors",
    "EvaluationReport": "dask_infer.evaluation",
    "InputError": "dask_infer.errors",
    "ModelError": "dask_infer.errors",
    "RunConfig": "dask_infer.config",
    "RunSummary": "dask_infer.workflows.summary",
    "StagePlan": "dask_infer.partition",
    "compress_stages": "dask_infer.partition.compress",
    "evaluate": "dask_infer.evaluation",
    "format_plan": "dask_infer.partition",
    "open_images": "dask_infer.io",
    "open_results": "dask_infer.io.outputs",
    "partition_model": "dask_infer.partition",
    "predict": "dask_infer.workflows.lazy",
    "run": "dask_infer.api",
    "split_model": "dask_infer.partition",
    "write_image_dataset": "dask_infer.io",
    "write_sample": "dask_infer.io",
}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'dask_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
