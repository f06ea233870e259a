"""Tracing a model while another thread runs one: the process-wide lock keeps both correct."""

from __future__ import annotations

import threading
import time

import torch
import torchvision

from dask_infer.models.tracing import running_modules, tracing
from dask_infer.partition.split import trace_model


def test_tracing_waits_for_running_modules_and_blocks_new_ones() -> None:
    events: list[str] = []
    inside = threading.Event()

    def run() -> None:
        with running_modules():
            inside.set()
            time.sleep(0.2)
            events.append("run done")

    worker = threading.Thread(target=run)
    worker.start()
    inside.wait()
    with tracing():
        events.append("trace")
        with tracing():  # re-entrant for the tracing thread
            events.append("nested trace")
    worker.join()
    assert events == ["run done", "trace", "nested trace"]


def test_a_model_runs_correctly_while_another_is_traced() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                with running_modules(), torch.no_grad():
                    assert torch.equal(model(x), expected)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        other = torchvision.models.resnet18(num_classes=10).eval()
        for _ in range(20):
            trace_model(other)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors[0]
