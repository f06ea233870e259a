"""The host buffer ring: reuse, no aliasing while leased, fallback past capacity."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from distributed import Client

from dask_infer.io.buffers import HostBufferPool, PoolStats, host_pool
from dask_infer.io.images import describe_source, read_chunk


def test_buffers_come_back_and_are_reused() -> None:
    pool = HostBufferPool(capacity=2)
    a = pool.lease((4, 8), "uint8")
    address = a.__array_interface__["data"][0]
    del a
    gc.collect()
    b = pool.lease((4, 8), "uint8")
    assert b.__array_interface__["data"][0] == address
    assert pool.stats().reused == 1 and pool.stats().allocated == 1


def test_live_leases_never_share_memory_and_overflow_falls_back() -> None:
    pool = HostBufferPool(capacity=3)
    live = [pool.lease((16,), "float32") for _ in range(5)]
    for i, arr in enumerate(live):
        arr[:] = i
    assert [float(a[0]) for a in live] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert pool.stats().allocated == 3 and pool.stats().overflow == 2


def test_a_new_chunk_size_replaces_free_buffers_of_an_old_one() -> None:
    """A later run with other chunks must still get pooled (pinned) buffers."""
    pool = HostBufferPool(capacity=2)
    old = [pool.lease((4, 8), "uint8") for _ in range(2)]
    del old
    gc.collect()
    new = [pool.lease((16, 8), "uint8") for _ in range(2)]
    assert pool.stats() == PoolStats(reused=0, allocated=4, overflow=0)
    del new
    gc.collect()
    again = pool.lease((16, 8), "uint8")
    assert pool.stats().reused == 1
    # With every buffer leased, a new size still falls back instead of evicting a live one.
    held = [again, pool.lease((16, 8), "uint8")]
    other = pool.lease((2, 8), "uint8")
    other[:] = 7
    assert pool.stats().overflow == 1 and len(held) == 2


def test_concurrent_leases_keep_their_contents() -> None:
    pool = HostBufferPool(capacity=4)

    def work(i: int) -> bool:
        arr = pool.lease((64, 64), "uint8")
        arr[:] = i % 251
        ok = bool((arr == i % 251).all())
        del arr
        return ok

    with ThreadPoolExecutor(4) as ex:  # at most 4 leases live at once: the pool's capacity
        assert all(ex.map(work, range(400)))
    stats = pool.stats()
    assert stats.overflow == 0 and 1 <= stats.allocated <= 4
    assert stats.reused == 400 - stats.allocated


def test_reads_land_in_pooled_buffers_with_the_right_images(small_dataset: Path) -> None:
    source = describe_source(str(small_dataset))
    import zarr

    want = zarr.open_group(str(small_dataset), mode="r")["images"]
    before = host_pool().stats()
    chunks = [read_chunk(source, s, s + 16) for s in range(0, 64, 16)]
    for i, chunk in enumerate(chunks):
        np.testing.assert_array_equal(chunk, want[16 * i : 16 * (i + 1)])
    del chunks
    gc.collect()
    again = read_chunk(source, 0, 16)
    np.testing.assert_array_equal(again, want[0:16])
    assert host_pool().stats().reused > before.reused


def test_workers_reuse_buffers_during_a_run(
    client: Client, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    import dask_infer

    dask_infer.run(
        str(small_dataset),
        str(tmp_path / "o.zarr"),
        model="resnet18",
        weights=str(small_weights),
        chunk_size=16,
        client=client,
        progress=False,
        echo=None,
    )
    stats = client.run(lambda: host_pool().stats())
    assert sum(s.reused for s in stats.values()) > 0


def test_the_pool_keeps_under_its_byte_bound() -> None:
    """On a worker the pool may hold 1/8 of its memory_limit: a lease that would pass the bound drops a
    free buffer first, or, with every buffer leased, is an ordinary array."""
    pool = HostBufferPool(capacity=8, max_bytes=3000)
    a = pool.lease((1000,), "uint8")
    b = pool.lease((1000,), "uint8")
    c = pool.lease((1000,), "uint8")
    d = pool.lease((1000,), "uint8")  # over 3000 bytes with three leased: not pooled
    assert pool.stats() == PoolStats(reused=0, allocated=3, overflow=1)
    del a, b, c, d
    gc.collect()
    big = pool.lease((2500,), "uint8")  # frees two of the three free 1000-byte buffers to fit
    assert pool.stats().allocated == 4 and pool._bytes <= 3000
    del big


def test_a_workers_pool_is_bounded_by_its_memory_limit(client: Client) -> None:
    limits = client.run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    bounds = client.run(lambda: host_pool().max_bytes)
    assert bounds == {w: limit // 8 for w, limit in limits.items()}
