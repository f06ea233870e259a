"""Compute threads of a runtime: how many, and none left behind by a failed load."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest

from dask_infer.workflows.runtime import ModelRuntime
from dask_infer.workflows.stages import RuntimeSpec
from dask_infer.workflows.streams import GPU_STREAMS_ENV, compute_threads, gpu_streams

SPEC = RuntimeSpec(
    model="resnet18",
    weights=None,
    num_classes=10,
    input_size=32,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    outputs=("logits",),
    top_k=5,
    device="cuda",
)


def test_one_stream_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(GPU_STREAMS_ENV, raising=False)
    assert gpu_streams() == 1
    monkeypatch.setenv(GPU_STREAMS_ENV, " 2 ")
    assert gpu_streams() == 2


@pytest.mark.parametrize("text", ["0", "9", "two", "1.5", "-1"])
def test_a_bad_stream_count_names_the_value_and_the_fix(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(GPU_STREAMS_ENV, text)
    with pytest.raises(RuntimeError, match=rf"{GPU_STREAMS_ENV}='{text}'.*from 1 to 8.*e\.g\. 2"):
        gpu_streams()


def test_graphs_features_and_cpus_keep_one_compute_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GPU_STREAMS_ENV, "2")
    assert compute_threads(SPEC) == 2
    assert compute_threads(replace(SPEC, compress="bf16+channels_last+compile")) == 2
    assert compute_threads(replace(SPEC, compress="auto")) == 2
    assert compute_threads(replace(SPEC, compress="bf16+channels_last+cudagraphs")) == 1
    # One stage of two replays graphs: the whole runtime keeps one thread.
    two = replace(SPEC, cut_points=("layer2",), compress="0:fp32,1:bf16+cudagraphs")
    assert compute_threads(two) == 1
    assert compute_threads(replace(SPEC, feature_layer="avgpool")) == 1
    assert compute_threads(replace(SPEC, device="cpu")) == 1


def test_a_failed_load_leaves_no_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ModelRuntime, address: str | None = None, resources: object = None) -> None:
        raise RuntimeError("weights file is missing")

    monkeypatch.setattr(ModelRuntime, "load", load)
    worker = SimpleNamespace(
        address="tcp://127.0.0.1:1", state=SimpleNamespace(nthreads=1, total_resources={}), executors={}
    )
    with pytest.raises(RuntimeError, match="weights file is missing"):
        asyncio.run(ModelRuntime(replace(SPEC, device="cpu"), "rt-failed").setup(worker))
    assert worker.executors == {}
