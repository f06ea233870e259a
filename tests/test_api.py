"""One set of run options: Python, YAML and the CLI take the same ones, parsed to the same config."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

import dask_infer
import dask_infer.api
from dask_infer.cli import main
from dask_infer.config import RunConfig, option_help
from dask_infer.models import available_models
from dask_infer.options import DEFAULT_BALANCE

FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
PYTHON_ONLY = {"transform"}
"""Fields holding Python objects: keywords of dask_infer.run only, and excluded by the other knobs."""

# Every field set to something other than its default.
EVERYTHING: dict[str, Any] = {
    "input": "in.zarr",
    "output": "out.zarr",
    "model": "resnet18",
    "model_kwargs": {"width": 8},
    "weights": "w.pt",
    "num_classes": 10,
    "variable": "pixels",
    "layout": "NHWC",
    "dims": {"image": "time", "channel": "band"},
    "bands": (3, 2, 1),
    "scale": 10000.0,
    "resize": 40,
    "crop": 32,
    "interpolation": "bicubic",
    "mean": (0.1, 0.2, 0.3),
    "std": (0.4, 0.5, 0.6),
    "normalize": False,
    "missing_chunks": "fill",
    "outputs": ("probabilities", "top_k", "features"),
    "top_k": 3,
    "activation": "sigmoid",
    "feature_layer": "avgpool",
    "tile": 64,
    "halo": 8,
    "stride": 32,
    "logits_dtype": "float16",
    "scale_factor": 0.5,
    "chunk_size": 8,
    "batch_size": 4,
    "scheduler": None,
    "scheduler_file": "scheduler.json",
    "tls_ca_file": "ca.pem",
    "tls_cert": "client.pem",
    "tls_key": "client.key",
    "n_workers": 3,
    "threads_per_worker": 2,
    "memory_limit": "2GB",
    "device": "cpu",
    "stages": 2,
    "balance": "flops",
    "placement": "hybrid",
    "replicas": 1,
    "rebalance": 1.5,
    "report": "r.html",
    "summary": "s.json",
    "compress": "0:bf16,1:fp16",
    "calibration_images": 16,
    "overwrite": False,
    "resume": True,
    "progress": False,
    "storage_options": {"anon": True},
}

CLI_ARGS = [
    "--input", "in.zarr", "--output", "out.zarr", "--model", "resnet18", "--model-kwargs", '{"width": 8}',
    "--weights", "w.pt",
    "--num-classes", "10", "--variable", "pixels", "--layout", "NHWC",
    "--dims", "image=time,channel=band", "--bands", "3,2,1", "--scale", "10000", "--resize", "40",
    "--crop", "32", "--interpolation", "bicubic", "--mean", "0.1,0.2,0.3", "--std", "0.4,0.5,0.6",
    "--no-normalize", "--missing-chunks", "fill",
    "--outputs", "probabilities,top_k,features",
    "--top-k", "3", "--activation", "sigmoid", "--feature-layer", "avgpool",
    "--tile", "64", "--halo", "8", "--stride", "32", "--logits-dtype", "float16", "--scale-factor", "0.5",
    "--chunk-size", "8", "--batch-size", "4", "--scheduler-file", "scheduler.json",
    "--tls-ca-file", "ca.pem", "--tls-cert", "client.pem", "--tls-key", "client.key",
    "--workers", "3", "--threads", "2", "--memory-limit", "2GB",
    "--device", "cpu", "--stages", "2", "--balance", "flops",
    "--placement", "hybrid", "--replicas", "1", "--rebalance", "1.5", "--report", "r.html",
    "--summary", "s.json", "--compress", "0:bf16,1:fp16", "--calibration-images", "16", "--resume",
    "--no-progress", "--storage-options", '{"anon": true}',
]  # fmt: skip


def test_everything_covers_every_field() -> None:
    assert set(EVERYTHING) == FIELDS - PYTHON_ONLY
    defaults = RunConfig(input="a", output="b")
    assert all(
        getattr(defaults, k) != v
        for k, v in EVERYTHING.items()
        if k not in ("input", "output", "scheduler", "overwrite")  # overwrite excludes resume
    )


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[RunConfig]:
    """Configs that reach the run, without running anything."""
    seen: list[RunConfig] = []
    monkeypatch.setattr(dask_infer.api, "run_config", lambda config, **_: seen.append(config))
    return seen


def test_python_yaml_and_cli_give_the_same_config(captured: list[RunConfig], tmp_path: Path) -> None:
    expected = RunConfig(**EVERYTHING)
    dask_infer.run(**EVERYTHING)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(expected.to_dict()))
    dask_infer.run(config=str(config_file))
    result = CliRunner().invoke(main, ["run", *CLI_ARGS])
    assert result.exit_code == 0, result.output
    assert captured == [expected, expected, expected]


def test_every_option_is_reachable_from_each_entry_point() -> None:
    python = set(inspect.signature(dask_infer.run).parameters) - {"config", "client", "echo"}
    command = main.commands["run"]
    cli = {p.name for p in command.params} - {"config_file", "no_rebalance"}
    yaml_keys = set(RunConfig(input="a", output="b").to_dict())
    assert python == yaml_keys == FIELDS and cli == FIELDS - PYTHON_ONLY
    # The docstring of dask_infer.run documents each, from RunConfig's own.
    doc = dask_infer.run.__doc__ or ""
    assert all(f"\n    {name}\n" in doc for name in FIELDS)
    assert set(option_help()) == FIELDS and all(option_help().values())


def test_unknown_python_option_is_named(captured: list[RunConfig]) -> None:
    with pytest.raises(dask_infer.DaskInferError, match=r"unknown option\(s\) \['chunks'\]"):
        dask_infer.run("a", "b", chunks=4)


def test_explicit_options_win_over_the_file_and_no_rebalance(
    captured: list[RunConfig], tmp_path: Path
) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"input": "a", "output": "b", "top_k": 2, "rebalance": 1.3}))
    result = CliRunner().invoke(main, ["run", "--config", str(config_file), "--top-k", "4", "--no-rebalance"])
    assert result.exit_code == 0, result.output
    assert captured[-1].top_k == 4 and captured[-1].rebalance is None and captured[-1].input == "a"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage-options", "{anon"], "--storage-options '{anon' is not JSON"),
        (["--rebalance", "1.2", "--no-rebalance"], "--rebalance and --no-rebalance both given"),
        (["--scheduler", "tcp://x:1", "--scheduler-file", "s.json"], "both given; give one of them"),
    ],
)
def test_bad_cli_values_are_one_line(captured: list[RunConfig], args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["run", "--input", "a", "--output", "b", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_help_everywhere() -> None:
    runner = CliRunner()
    for args in ([], ["run"], ["partition"], ["evaluate"], ["models"], ["sample"], ["ingest"], ["demo"]):
        short, long = runner.invoke(main, [*args, "-h"]), runner.invoke(main, [*args, "--help"])
        assert short.exit_code == 0 and short.output == long.output
    for name, command in main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"dask-infer {name} {param.opts[0]} has no help text"


def test_one_balance_default_and_one_batch_size_spelling() -> None:
    assert RunConfig(input="a", output="b").balance == DEFAULT_BALANCE
    for name in ("partition", "evaluate"):
        params = {p.name: p for p in main.commands[name].params}
        assert params["balance"].default == DEFAULT_BALANCE
        assert "--batch-size" in params["batch_size"].opts
    assert "--batch" in {o for p in main.commands["partition"].params for o in p.opts}


def test_partition_takes_batch_size_and_its_old_spelling(tmp_path: Path) -> None:
    runner = CliRunner()
    outputs = []
    for flag in ("--batch-size", "--batch"):
        path = tmp_path / f"{flag.strip('-')}.json"
        args = ["partition", "--model", "resnet18", "--stages", "2", "--balance", "flops", "--size", "32"]
        result = runner.invoke(main, [*args, flag, "3", "--json", str(path)])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(path.read_text()))
    assert outputs[0]["input_shape"] == outputs[1]["input_shape"] == [3, 3, 32, 32]


def test_models_lists_task_input_size_and_parameters() -> None:
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["model", "task", "input", "params"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["resnet50"] == ["classification", "224x224", "25.6M"]
    assert rows["inception_v3"][1] == "299x299"
    assert len(rows) == len(available_models()) >= 80
