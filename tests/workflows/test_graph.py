"""How images are cut into tasks: whole storage chunks, sized by model cost and image bytes."""

from __future__ import annotations

import numpy as np
import pytest

from dask_infer.io.images import ImageSource
from dask_infer.workflows.graph import ChunkMemoryError, chunk_target, split_chunks


def test_chunks_are_whole_storage_chunks_and_cover_every_image() -> None:
    plan = split_chunks(1000, 32, target=64, min_tasks=2)
    assert plan.size == 64 and plan.bounds[0] == (0, 64) and plan.bounds[-1] == (960, 1000)
    assert [s for s, _ in plan.bounds] == list(range(0, 1000, 64))
    small = split_chunks(100, 16, target=64, min_tasks=4)
    assert small.size == 32 and len(small.bounds) == 4
    huge = split_chunks(10_000, 5000, target=64)
    assert huge.size == 64


def test_chunk_target_follows_model_cost_and_image_size() -> None:
    rgb224 = 224 * 224 * 3
    assert chunk_target(8.2e9, rgb224, gpu=True) == 304  # ResNet-50 on a GPU: ~50 ms a task
    assert chunk_target(8.2e9, rgb224, gpu=False) == 16  # floor: batches stay efficient
    assert chunk_target(1e6, rgb224, gpu=False) == (256 << 20) // rgb224  # capped by memory
    assert chunk_target(1e6, 32 * 32, gpu=False) == 4096


def test_an_asked_chunk_size_is_kept_exactly() -> None:
    """``chunk_size=32`` over storage chunks of 64 gives tasks of 32, not 64 (the run says why it costs)."""
    exact = split_chunks(200, 64, target=32, min_tasks=100, exact=True)
    assert exact.size == 32 and exact.bounds == tuple((s, min(s + 32, 200)) for s in range(0, 200, 32))
    assert split_chunks(200, 64, target=32).size == 64


@pytest.mark.parametrize(
    ("dtype", "itemsize"), [("uint8", 1), ("uint16", 2), ("float16", 2), ("float32", 4), ("float64", 8)]
)
def test_bytes_per_image_counts_the_stored_dtype(dtype: str, itemsize: int) -> None:
    source = ImageSource("x.zarr", "images", "NCHW", (10, 3, 50, 40), dtype, 5)
    assert source.bytes_per_image == 3 * 50 * 40 * itemsize == 3 * 50 * 40 * np.dtype(dtype).itemsize
    # A float64 image is twice a float32 one, so the memory cap allows half as many per task
    # (counting 4 bytes per value, as chunk sizing once did, would allow 21).
    if dtype == "float64":
        big = ImageSource("x.zarr", "images", "NHWC", (10, 1024, 1024, 3), dtype, 5)
        assert chunk_target(1e6, big.bytes_per_image, gpu=False) == (256 << 20) // (1024 * 1024 * 3 * 8) == 10


def test_chunks_fit_the_smallest_worker_memory_limit() -> None:
    """264 MB chunks on 2 GB workers stall them: 60% of the limit, less what the worker process and
    the model take, is shared by the 8 chunks a worker may hold at once."""
    rgb224 = 224 * 224 * 3
    unlimited = chunk_target(1e6, rgb224, gpu=False)
    assert unlimited == (256 << 20) // rgb224
    two = 2 << 30
    room = int(two * 0.6)
    assert chunk_target(1e6, rgb224, gpu=False, memory_limit=two) == room // 8 // rgb224 == 1069
    # The worker's own memory and the model's come off first.
    taken = chunk_target(
        1e6, rgb224, gpu=False, memory_limit=two, worker_bytes=400 << 20, model_bytes=500 << 20
    )
    assert taken == (room - (900 << 20)) // 8 // rgb224 == 286
    assert chunk_target(1e6, rgb224, gpu=False, memory_limit=0) == unlimited
    # A limit that cannot hold a few images is refused in one line naming the figures and the fix.
    with pytest.raises(ChunkMemoryError, match=r"memory_limit=1.00 GiB have no room for images") as err:
        chunk_target(
            8e9, rgb224, gpu=False, memory_limit=1 << 30, worker_bytes=600 << 20, model_bytes=100 << 20
        )
    assert "--memory-limit" in str(err.value) and "\n" not in str(err.value)
    # 8 images of 64 MiB fit in 60% of 1 GiB: tasks of one image.
    assert chunk_target(1e6, 64 << 20, gpu=False, memory_limit=1 << 30) == 1
