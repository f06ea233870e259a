"""The model: registry, weights from local files, preprocessing and the fx tracing lock."""

from dask_infer.models.preprocess import Preprocess
from dask_infer.models.registry import (
    LoadedModel,
    ModelDefaults,
    available_models,
    build_model,
    check_model_name,
    model_defaults,
)
from dask_infer.models.weights import load_weights_file, weights_metadata_key

__all__ = [
    "LoadedModel",
    "ModelDefaults",
    "Preprocess",
    "available_models",
    "build_model",
    "check_model_name",
    "load_weights_file",
    "model_defaults",
    "weights_metadata_key",
]
