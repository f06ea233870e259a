"""Zarr in and out: image datasets, samples, ingest and result stores."""

from dask_infer.io.dataset import write_image_dataset
from dask_infer.io.images import ImageSource, describe_source, open_images, read_chunk
from dask_infer.io.samples import write_sample

__all__ = [
    "ImageSource",
    "describe_source",
    "open_images",
    "read_chunk",
    "write_image_dataset",
    "write_sample",
]
