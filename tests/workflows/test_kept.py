"""A worker keeps a finished run's stages for the next run of the same model, and only for it."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import xarray as xr
import zarr
from distributed import Client

from dask_infer.models import build_model
from dask_infer.workflows import kept as kept_module
from dask_infer.workflows.kept import Kept, WeightsDigest, build_key, keep, keep_seconds, take
from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from tests.reference import assert_close_logits, reference_logits, run_small


def _spec(weights: str, **changes: object) -> RuntimeSpec:
    spec = RuntimeSpec(
        model="resnet18",
        weights=weights,
        num_classes=10,
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        outputs=("logits",),
        top_k=5,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def test_the_key_leaves_out_what_only_shapes_outputs(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    base = build_key(_spec(str(weights)), (0,), 32, "cpu")
    same = _spec(
        str(weights),
        outputs=("probabilities", "top_k"),
        top_k=3,
        activation="sigmoid",
        stage_map=(("a", (0,)),),
    )
    assert build_key(same, (0,), 32, "cpu") == base
    for other in (
        build_key(_spec(str(weights), compress="bf16+compile"), (0,), 32, "cpu"),
        build_key(_spec(str(weights), cut_points=("layer2",)), (0,), 32, "cpu"),
        build_key(_spec(str(weights)), (1,), 32, "cpu"),
        build_key(_spec(str(weights)), (0,), 16, "cpu"),
        build_key(_spec(str(weights)), (0,), 32, "cuda:0"),
        build_key(_spec(str(weights), num_classes=5), (0,), 32, "cpu"),
    ):
        assert other != base


def test_a_weights_file_rewritten_in_place_is_not_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The file counts by its content: the same path, size and mtime with other bytes is built again."""
    monkeypatch.delenv(kept_module.KEEP_ENV, raising=False)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    key = build_key(_spec(str(weights)), (0,), 32, "cpu")
    digest = WeightsDigest(str(weights))
    assert digest.matches_file()
    keep(Kept(key, digest, {0: torch.nn.Identity()}, None, 1.0))
    assert take(key) is not None
    keep(Kept(key, digest, {0: torch.nn.Identity()}, None, 1.0))
    stat = weights.stat()
    weights.write_bytes(b"other!!")  # the same path and size, rewritten ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... with the same mtime
    assert not digest.matches_file()
    assert take(key) is None
    assert not WeightsDigest(str(tmp_path / "gone.pt")).matches_file()
    assert WeightsDigest(None).matches_file()


def test_take_returns_only_a_match_and_drops_what_was_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kept_module.KEEP_ENV, raising=False)
    a = build_key(_spec("/nowhere/a.pt"), (0,), 32, "cpu")
    b = build_key(_spec("/nowhere/b.pt"), (0,), 32, "cpu")
    stages = {0: torch.nn.Identity()}
    none = WeightsDigest(None)
    keep(Kept(a, none, stages, None, 3.5))
    assert take(b) is None
    assert take(a) is None  # dropped by the miss: one model in memory, not two
    keep(Kept(a, none, stages, None, 3.5))
    got = take(a)
    assert got is not None and got.stages is stages and got.build_s == 3.5
    assert take(a) is None  # taken once
    monkeypatch.setenv(kept_module.KEEP_ENV, "0")
    keep(Kept(a, none, stages, None, 3.5))
    assert take(a) is None


def test_kept_stages_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kept_module.KEEP_ENV, "0.05")
    a = build_key(_spec("/nowhere/a.pt"), (0,), 32, "cpu")
    entry = Kept(a, WeightsDigest(None), {0: torch.nn.Identity()}, None, 1.0)
    keep(entry)
    kept_module._expire(entry)  # what the timer calls when the time is up
    assert take(a) is None


@pytest.mark.parametrize(("text", "value"), [("", 600.0), ("0", 0.0), ("30", 30.0), (" 1.5 ", 1.5)])
def test_keep_seconds(monkeypatch: pytest.MonkeyPatch, text: str, value: float) -> None:
    monkeypatch.setenv(kept_module.KEEP_ENV, text)
    assert keep_seconds() == value


@pytest.mark.parametrize("text", ["-1", "soon", "nan"])
def test_bad_keep_seconds(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(kept_module.KEEP_ENV, text)
    with pytest.raises(
        RuntimeError, match=f"DASK_INFER_KEEP_LOADED_S='{text}' is not a number of seconds >= 0"
    ):
        keep_seconds()


def test_a_second_run_takes_the_first_runs_stages(
    client: Client, small_dataset: Path, tmp_path: Path
) -> None:
    """Two runs of one model on the same workers: the second builds nothing and writes the same
    logits; a weights file rewritten in place is built again, and its logits are the new weights'."""
    weights = tmp_path / "w.pt"
    meta = {"model": "resnet18", "input_size": 32, "class_names": [f"c{i}" for i in range(10)]}
    torch.save(
        {"state_dict": build_model("resnet18", num_classes=10, seed=7).module.state_dict(), "meta": meta},
        weights,
    )
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]

    first = run_small(client, small_dataset, tmp_path / "a.zarr", weights, chunk_size=16)
    second = run_small(
        client, small_dataset, tmp_path / "b.zarr", weights, chunk_size=16, outputs=("logits", "top_k")
    )
    assert (first.model_loads, first.reused_loads) == (2, 0)
    assert (second.model_loads, second.reused_loads) == (2, 2)
    want = reference_logits(images, "resnet18", str(weights))
    for out in ("a.zarr", "b.zarr"):
        assert_close_logits(xr.open_zarr(tmp_path / out)["logits"].values, want)

    torch.save(
        {"state_dict": build_model("resnet18", num_classes=10, seed=8).module.state_dict(), "meta": meta},
        weights,
    )
    third = run_small(client, small_dataset, tmp_path / "c.zarr", weights, chunk_size=16)
    assert third.reused_loads == 0
    assert_close_logits(
        xr.open_zarr(tmp_path / "c.zarr")["logits"].values, reference_logits(images, "resnet18", str(weights))
    )


def _worker(**plugins: object) -> SimpleNamespace:
    """What ``ModelRuntime.teardown`` touches of a worker."""
    return SimpleNamespace(executors={}, loop=SimpleNamespace(call_later=lambda *args: None), plugins=plugins)


def test_teardown_keeps_only_idle_stages(monkeypatch: pytest.MonkeyPatch, small_weights: Path) -> None:
    """In one process: a released runtime's stages go to the next equal one, unless a chunk was
    still running on them when it was released (a cancelled run's task)."""
    monkeypatch.delenv(kept_module.KEEP_ENV, raising=False)
    spec = replace(_spec(str(small_weights)), device="cpu", batch_size=8)
    first = ModelRuntime(spec, "first")
    first.load()
    stages = first._stages
    first.teardown(_worker())
    second = ModelRuntime(replace(spec, top_k=3), "second")
    second.load()
    assert second.reused and second._stages is stages and second.load_s == first.load_s

    second._in_flight = 1  # as while a chunk runs
    second.teardown(_worker())
    third = ModelRuntime(spec, "third")
    third.load()
    assert not third.reused and third._stages is not stages

    # A re-cut's runtime loaded beside it: releasing the old one keeps nothing, so the worker
    # holds one model, not the live one and a kept one.
    recut = ModelRuntime(replace(spec, cut_points=("layer1_0_add",)), "recut")
    recut.load()
    third.teardown(_worker(recut=recut))
    assert take(build_key(spec, (0,), 8, "cpu")) is None
    recut.teardown(_worker())
    assert take(build_key(recut.spec, (0, 1), 8, "cpu")) is not None  # alone, it was kept
