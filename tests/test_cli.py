"""The dask-infer command in a subprocess: results, and one clear line for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from safetensors.torch import save_file

from dask_infer.io.samples import write_sample
from dask_infer.models import build_model, weights_metadata_key
from dask_infer.workflows.cluster import scheduler_workers
from tests.certificates import Certificates, make_certificates
from tests.reference import assert_close_logits, assert_held_out_mistakes, reference_logits

CLI = [sys.executable, "-m", "dask_infer.cli"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_run_in_subprocess_matches_plain_pytorch(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.zarr"
    proc = _cli(
        "run",
        "--input",
        str(small_dataset),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        str(small_weights),
        "--workers",
        "2",
        "--threads",
        "1",
        "--chunk-size",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    assert "200 images in" in proc.stdout and "images/s" in proc.stdout and str(out) in proc.stdout
    assert "dashboard: http://127.0.0.1:" in proc.stdout
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(
        xr.open_zarr(out)["logits"].values, reference_logits(images, "resnet18", str(small_weights))
    )


@pytest.fixture()
def misfit_weights(tmp_path: Path) -> Path:
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    return path


@pytest.fixture()
def gray2d(tmp_path: Path) -> Path:
    path = tmp_path / "flat.zarr"
    zarr.create_array(str(path), shape=(4, 5), dtype="uint8")
    return path


@pytest.fixture()
def int_images(tmp_path: Path) -> Path:
    path = tmp_path / "int.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("images", shape=(4, 8, 8, 3), dtype="int64")
    return path


_NO_CHECKS = "{tmp}/notes.txt"
"""A file that exists but is no certificate: TLS checks get past 'does not exist' and fail on loading."""

_TLS_NOWHERE = ["--weights", "{weights}", "--scheduler", "tls://127.0.0.1:1"]

# case: (options after --input/--output/--model, with {tmp} and {weights} filled in; the message)
_BAD_OPTIONS: dict[str, tuple[list[str], str]] = {
    "outputs-unknown": (["--outputs", "logits,bogus"], "outputs=['logits', 'bogus']: choose one or more of"),
    "top-k-zero": (["--top-k", "0"], "Invalid value for '--top-k': 0 is not in the range x>=1"),
    "stages-zero": (["--stages", "0"], "Invalid value for '--stages': 0 is not in the range x>=1"),
    "chunk-size-negative": (["--chunk-size", "-3"], "Invalid value for '--chunk-size': -3 is not in"),
    "workers-zero": (["--workers", "0"], "Invalid value for '--workers': 0 is not in the range x>=1"),
    "placement-unknown": (["--placement", "bogus"], "'--placement': 'bogus' is not one of 'auto', 'data'"),
    "device-unknown": (["--device", "tpu"], "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    "balance-unknown": (["--balance", "bogus"], "'--balance': 'bogus' is not one of 'time', 'flops'"),
    "layout-unknown": (["--layout", "XYZ"], "'--layout': 'XYZ' is not one of 'auto', 'NHWC', 'NCHW'"),
    "flag-unknown": (
        ["--chunksize", "4"],
        "No such option '--chunksize'. (Did you mean one of: '--batch-size', '--chunk-size'",
    ),
    "compress-unknown": (["--compress", "nonsense"], "unknown recipe term 'nonsense' in 'nonsense'"),
    "compress-stage": (["--stages", "2", "--compress", "0-3:int8"], "names stage(s) [2, 3] but the model"),
    "compress-auto-bound": (["--compress", "auto=2"], "auto bound '2' in 'auto=2' is not a top-1 agreement"),
    "config-missing": (["--config", "{tmp}/none.yaml"], "none.yaml' does not exist"),
    "config-list": (["--config", "{tmp}/run.yaml"], "run.yaml' must hold a mapping of options"),
    "config-unknown-key": (["--config", "{tmp}/run.yaml"], "unknown config keys ['bogus_key']; known keys:"),
    "folder-as-weights": (["--weights", "{tmp}/folder"], "folder' does not exist; give a local .pt, .pth"),
    "text-as-weights": (["--weights", "{tmp}/notes.txt"], "notes.txt' cannot be read as a state_dict"),
    "num-classes": (["--weights", "{weights}", "--num-classes", "7"], "fc.weight (10, 512) != (7, 512)"),
    "variable": (["--variable", "pixels"], "has no array 'pixels'; it has: image, images, label"),
    "layout-wrong": (
        ["--weights", "{weights}", "--layout", "NCHW"],
        "has 32 channel(s) but model resnet18's first layer takes 3; pick 3 with --bands",
    ),
    "input-file": (["--input", "{tmp}/notes.txt"], "notes.txt' is not a readable Zarr store"),
    "resume-nothing": (["--weights", "{weights}", "--resume"], "holds no run to resume"),
    "resume-overwrite": (
        ["--resume", "--overwrite"],
        "resume=True and overwrite=True both given; resume keeps the output",
    ),
    "replicas": (["--replicas", "2"], "replicas=2 applies to placement='hybrid' only, not 'auto'"),
    "rebalance-below-one": (["--rebalance", "0.5"], "rebalance=0.5 must be a max/mean stage time ratio"),
    "rebalance-twice": (["--rebalance", "1.5", "--no-rebalance"], "--rebalance and --no-rebalance both"),
    "stages-too-many": (["--weights", "{weights}", "--stages", "99"], "stages=99 but resnet18 has only"),
    "storage-options-json": (["--storage-options", "{{anon"], "--storage-options '{{anon' is not JSON"),
    "memory-limit": (["--memory-limit", "lots"], "memory_limit='lots' must be a size such as '4GB'"),
    "output-under-a-file": (["--output", "{tmp}/notes.txt/o.zarr"], "notes.txt' is a file, not a folder"),
    "output-unwritable": (["--output", "/proc/self/o.zarr"], "may not write in the folder '/proc/self'"),
    "summary-folder": (["--summary", "{tmp}/folder"], "folder' cannot be written: it is a folder"),
    "summary-under-a-file": (["--summary", "{tmp}/notes.txt/s.json"], "notes.txt' is a file, not a folder"),
    "report-under-a-file": (["--report", "{tmp}/notes.txt/r.html"], "notes.txt' is a file, not a folder"),
    "report-not-html": (["--report", "{tmp}/r.txt"], "report='{tmp}/r.txt' must name an .html file"),
    "scheduler-scheme": (["--scheduler", "foo://x:1"], "'foo://x:1' has unknown scheme 'foo'; give one of"),
    "scheduler-no-port": (["--scheduler", "tcp://"], "scheduler 'tcp://' is not an address"),
    "scheduler-and-file": (
        ["--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", "{tmp}/s.json"],
        "scheduler='tcp://127.0.0.1:1' and scheduler_file='{tmp}/s.json' both given; give one of them",
    ),
    "scheduler-file-not-json": (["--scheduler-file", "{tmp}/notes.txt"], "notes.txt' is not a scheduler's"),
    "scheduler-unreachable": (
        ["--weights", "{weights}", "--scheduler", "tcp://127.0.0.1:1"],
        "cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'",
    ),
    "tls-without-certificates": (_TLS_NOWHERE, "needs TLS but no --tls-ca-file or --tls-cert is set"),
    "tls-certificate-missing": (
        [*_TLS_NOWHERE, "--tls-ca-file", _NO_CHECKS, "--tls-cert", "{tmp}/none.pem"],
        "--tls-cert '{tmp}/none.pem' does not exist",
    ),
    "tls-not-pem": (
        [*_TLS_NOWHERE, "--tls-ca-file", _NO_CHECKS, "--tls-cert", _NO_CHECKS],
        "the TLS files do not load",
    ),
    "tls-for-local-cluster": (["--tls-ca-file", _NO_CHECKS], "applies to a tls:// scheduler; give"),
    "tls-for-tcp": (
        ["--scheduler", "tcp://127.0.0.1:1", "--tls-ca-file", _NO_CHECKS],
        "scheduler='tcp://127.0.0.1:1' is not encrypted; use its tls:// address",
    ),
    "model-import-fails": (["--model", "no_such_pkg_xyz:make"], "cannot import 'no_such_pkg_xyz:make': No"),
    "model-factory-not-module": (
        ["--model", "tests.own_models:not_a_module"],
        "factory 'tests.own_models:not_a_module' returned a dict, not a torch.nn.Module",
    ),
    "model-kwargs-json": (["--model-kwargs", "{{width"], "--model-kwargs '{{width' is not JSON"),
    "model-not-pt2": (["--model", "{tmp}/bad.pt2"], "bad.pt2' is not a saved torch.export program"),
    "model-unsplittable": (
        ["--model", "tests.own_models:branchy", "--stages", "2"],
        "Branchy cannot be split: torch.fx cannot trace it",
    ),
    "bands-out-of-range": (
        ["--weights", "{weights}", "--bands", "3,5,1"],
        "bands=3,5,1: input array 'images' has 3 band(s), numbered 1 to 3 (bands are 1-based); band 5",
    ),
    "tile-larger-than-image": (["--tile", "64"], "tile=64 is larger than the images of"),
    "halo-larger-than-tile": (["--tile", "16", "--halo", "24"], "halo=24 is larger than tile=16"),
    "stride-leaves-gaps": (["--tile", "16", "--stride", "20"], "stride=20 is larger than tile=16, so tiles"),
    "mask-not-a-map": (
        ["--weights", "{weights}", "--tile", "16", "--outputs", "mask"],
        "resnet18 gives per-tile outputs of shape (10,), not a map, so outputs 'mask' does not apply",
    ),
    "mask-without-tile": (["--outputs", "mask"], "outputs include 'mask', which tiled runs write; give"),
    "logits-dtype-unknown": (
        ["--tile", "16", "--logits-dtype", "float64"],
        "'--logits-dtype': 'float64' is not one of 'float32', 'float16'",
    ),
    "logits-dtype-without-tile": (["--logits-dtype", "float16"], "logits_dtype='float16' given without tile"),
    "tile-scheduler-unreachable": (
        ["--weights", "{weights}", "--tile", "16", "--scheduler", "tcp://127.0.0.1:1"],
        "cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'",
    ),
    "tile-stages-beyond-cuts": (
        ["--weights", "{weights}", "--tile", "16", "--stages", "99", "--placement", "pipeline"],
        "stages=99 but resnet18 has only",
    ),
    "scale-factor-zero": (["--tile", "16", "--scale-factor", "0"], "scale_factor=0.0 must be a number > 0"),
    "scale-factor-negative": (["--tile", "16", "--scale-factor", "-0.5"], "scale_factor=-0.5 must be a"),
    "scale-factor-under-a-tile": (
        ["--tile", "16", "--scale-factor", "0.25"],
        "pixels, smaller than tile=16; give a scale factor of at least 0.5 or a smaller tile",
    ),
    "scale-factor-without-tile": (["--scale-factor", "0.5"], "scale_factor=0.5 given without tile"),
    "dims-unknown": (
        ["--dims", "image=time,channel=band"],
        "maps image to 'time', but array 'images' has no dim 'time'; its dims are image, y, x, channel",
    ),
}


@pytest.mark.parametrize(
    ("variable", "value", "match"),
    [
        ("DASK_INFER_GPU_STREAMS", "two", "DASK_INFER_GPU_STREAMS='two' is not a whole number from 1 to 8"),
        ("DASK_INFER_GPU_STREAMS", "0", "DASK_INFER_GPU_STREAMS='0' is not a whole number from 1 to 8"),
        ("DASK_INFER_SWITCH_INTERVAL", "-1", "DASK_INFER_SWITCH_INTERVAL='-1' is not a positive number"),
        (
            "DASK_INFER_COMPILE_PREPROCESS",
            "yes",
            "DASK_INFER_COMPILE_PREPROCESS='yes' is not 1 or 0; set 1 to",
        ),
        ("DASK_INFER_INDUCTOR_FREEZING", "off", "DASK_INFER_INDUCTOR_FREEZING='off' is not 1 or 0; set 0 to"),
        ("DASK_INFER_KEEP_LOADED_S", "-5", "DASK_INFER_KEEP_LOADED_S='-5' is not a number of seconds >= 0"),
    ],
)
def test_bad_worker_setting_is_one_line_before_a_cluster(
    variable: str, value: str, match: str, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """A worker setting the workers would refuse stops the run here, before any cluster or output."""
    out = tmp_path / "o.zarr"
    proc = _cli(
        "run",
        "--input",
        str(small_dataset),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        str(small_weights),
        env={variable: value},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "does not exist"),
        ("no-image-array", "no image array"),
        ("wrong-dims", "has 2 dims"),
        ("dtype", "dtype int64"),
        ("same", "would overwrite the input"),
        ("exists", "exists; pass --overwrite"),
        ("model", "unknown model 'resnet5'"),
        ("weights", "does not fit model 'resnet18'"),
        ("weights-missing", "does not exist"),
        ("overwrite-project", "is a folder of 1 entry that is not a Zarr store; --overwrite"),
        ("overwrite-file", "is a file; --overwrite replaces only stores dask-infer wrote"),
        ("file-url-input", "would overwrite the input"),
        ("zero-size", "has images of zero size"),
        ("yaml-syntax", "is not plain YAML"),
        ("yaml-python-tag", "is not plain YAML"),
        ("yaml-bool", "overwrite='no' must be true or false"),
        ("yaml-text", "model=5 must be text"),
        ("weights-meta-not-json", "that is not JSON"),
        ("weights-input-size", "input_size=100000 in the metadata"),
        ("weights-mean", "mean=[0.5] in the metadata"),
        ("storage-options", "storage_options=[1] must be a mapping"),
        ("scheduler-file", "does not exist; give the file that `dask scheduler --scheduler-file` wrote"),
        *[(case, match) for case, (_, match) in _BAD_OPTIONS.items()],
        pytest.param(
            "cuda-without-gpu",
            "device='cuda' but no CUDA device is visible; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_input_one_line_no_traceback(
    case: str,
    match: str,
    small_dataset: Path,
    small_weights: Path,
    tmp_path: Path,
    misfit_weights: Path,
    gray2d: Path,
    int_images: Path,
) -> None:
    src, out, extra = str(small_dataset), str(tmp_path / "o.zarr"), ["--model", "resnet18"]
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "folder").mkdir()
    places = {"tmp": str(tmp_path), "weights": str(small_weights)}
    if case in _BAD_OPTIONS:
        extra += [arg.format(**places) for arg in _BAD_OPTIONS[case][0]]
        match = match.format(**places)
    elif case == "cuda-without-gpu":
        extra += ["--weights", str(small_weights), "--device", "cuda"]
    if case in ("config-list", "config-unknown-key"):
        text = {"config-list": "- a\n- b\n", "config-unknown-key": "bogus_key: 1\n"}[case]
        (tmp_path / "run.yaml").write_text(text)
    if case == "missing":
        src = str(tmp_path / "nope.zarr")
    elif case == "no-image-array":
        zarr.open_group(str(tmp_path / "empty.zarr"), mode="w").create_array(
            "label", shape=(3,), dtype="int64"
        )
        src = str(tmp_path / "empty.zarr")
    elif case == "wrong-dims":
        src = str(gray2d)
    elif case == "dtype":
        src = str(int_images)
    elif case == "same":
        out = src
    elif case == "exists":
        (tmp_path / "o.zarr").mkdir()
    elif case == "model":
        extra = ["--model", "resnet5"]
    elif case == "weights":
        extra += ["--weights", str(misfit_weights)]
    elif case == "weights-missing":
        extra += ["--weights", str(tmp_path / "none.pt")]
    elif case == "overwrite-project":
        (tmp_path / "project").mkdir()
        (tmp_path / "project" / "thesis.tex").write_text("years of work")
        out, extra = str(tmp_path / "project"), [*extra, "--overwrite"]
    elif case == "overwrite-file":
        out, extra = str(tmp_path / "notes.txt"), [*extra, "--overwrite"]
    elif case == "file-url-input":
        out, src, extra = src, f"file://{src}", [*extra, "--overwrite"]
    elif case == "zero-size":
        zarr.open_group(str(tmp_path / "z.zarr"), mode="w").create_array(
            "images", shape=(4, 0, 8, 3), dtype="uint8"
        )
        src = str(tmp_path / "z.zarr")
    elif case.startswith("yaml-"):
        text = {
            "yaml-syntax": "top_k: [1, 2\n",
            "yaml-python-tag": "model: !!python/object/apply:os.getcwd []\n",
            "yaml-bool": "overwrite: 'no'\n",
            "yaml-text": "model: 5\n",
        }[case]
        (tmp_path / "run.yaml").write_text(text)
        extra = ["--config", str(tmp_path / "run.yaml")]
    elif case.startswith("weights-"):
        meta = {"weights-input-size": {"input_size": 100000}, "weights-mean": {"mean": [0.5]}}.get(case)
        state = {
            k: v.contiguous() for k, v in build_model("resnet18", num_classes=10).module.state_dict().items()
        }
        raw = json.dumps(meta) if meta is not None else "{not json"
        save_file(state, str(tmp_path / "w.safetensors"), metadata={weights_metadata_key: raw})
        extra += ["--weights", str(tmp_path / "w.safetensors")]
    elif case == "storage-options":
        extra += ["--storage-options", "[1]"]
    elif case == "scheduler-file":
        extra += ["--scheduler-file", str(tmp_path / "none.json")]
    elif case == "model-not-pt2":
        (tmp_path / "bad.pt2").write_text("not a program")
    elif case == "model-unsplittable":
        from tests.own_models import branchy

        torch.save(branchy().state_dict(), tmp_path / "branchy.pt")
        extra += ["--weights", str(tmp_path / "branchy.pt")]
    watched = [Path(p) for p in (src.removeprefix("file://"), out) if Path(p).exists()]
    watched.append(tmp_path)
    before = {p: _digest(p) if p.is_dir() else p.read_bytes() for p in watched}
    proc = _cli("run", "--input", src, "--output", out, *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert before == {p: _digest(p) if p.is_dir() else p.read_bytes() for p in watched}
    assert not Path(out).exists() or Path(out) in watched


def test_sample_and_ingest_commands(tmp_path: Path) -> None:
    proc = _cli("sample", str(tmp_path / "s.zarr"), "--size", "16", "--count", "20")
    assert proc.returncode == 0 and "wrote 20 digits images" in proc.stdout
    assert xr.open_zarr(tmp_path / "s.zarr")["images"].shape == (20, 16, 16, 1)
    proc = _cli("sample", str(tmp_path / "s.zarr"))
    assert proc.returncode == 2 and "exists; pass --overwrite" in proc.stderr
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "f" / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(tmp_path / "f" / cls / "x.png")
    proc = _cli("ingest", str(tmp_path / "f"), str(tmp_path / "i.zarr"), "--size", "16")
    assert proc.returncode == 0 and "2 images of 16x16 in 2 classes" in proc.stdout
    proc = _cli("ingest", str(tmp_path / "nope"), str(tmp_path / "j.zarr"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_partition_and_evaluate_commands(small_dataset: Path, small_weights: Path, tmp_path: Path) -> None:
    proc = _cli(
        "partition",
        "--model",
        "resnet18",
        "--stages",
        "3",
        "--balance",
        "flops",
        "--size",
        "64",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "resnet18 in 3 stages, balanced by flops" in proc.stdout and "imbalance" in proc.stdout
    assert "1 thread," in proc.stdout
    proc = _cli("partition", "--model", "resnet18", "--stages", "2", "--size", "64", "--fused")
    assert proc.returncode == 0, proc.stderr
    assert "as compiled, pointwise ops fused" in proc.stdout and "_add" not in proc.stdout.splitlines()[-1]
    proc = _cli("partition", "--model", "resnet18", "--stages", "2", "--balance", "flops", "--fused")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --fused times the stages, but --balance is 'flops'; use --balance time, or drop --fused"
    ]
    proc = _cli("partition", "--model", "resnet18", "--stages", "99")
    assert (
        proc.returncode == 2 and proc.stderr.startswith("error: stages=99") and "Traceback" not in proc.stderr
    )
    report = tmp_path / "report.zarr"
    proc = _cli(
        "evaluate",
        "--input",
        str(small_dataset),
        "--model",
        "resnet18",
        "--weights",
        str(small_weights),
        "--compress",
        "bf16",
        "--images",
        "32",
        "--output",
        str(report),
    )
    assert proc.returncode == 0, proc.stderr
    assert "top-1 agreement" in proc.stdout
    from dask_infer.evaluation import read_report

    assert read_report(str(report)).to_dict()["compress"] is not None
    proc = _cli("evaluate", "--input", str(small_dataset), "--model", "resnet18", "--compress", "prune=1.5")
    assert proc.returncode == 2 and "prune" in proc.stderr and "Traceback" not in proc.stderr


# --- against `dask scheduler` and `dask worker` processes -----------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group ``proc`` leads (a worker's nanny and its worker), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def scheduler_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A `dask scheduler` on a random local port and one `dask worker` (nanny, 2 threads),
    each a process of its own, found through the file the scheduler writes."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("cluster")
    path = folder / "scheduler.json"
    dask_cli = [sys.executable, "-m", "dask"]
    common = ["--host", "127.0.0.1", "--no-dashboard", "--scheduler-file", str(path)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = [open(folder / name, "wb") for name in ("scheduler.log", "worker.log")]  # noqa: SIM115
    try:
        procs.append(
            subprocess.Popen(
                [*dask_cli, "scheduler", "--port", "0", *common],
                stdout=logs[0],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 60
        while not path.is_file() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (folder / "scheduler.log").read_text()
            time.sleep(0.1)
        procs.append(
            subprocess.Popen(
                [*dask_cli, "worker", "--nworkers", "1", "--nthreads", "2", *common],
                stdout=logs[1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        with Client(scheduler_file=str(path), timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
        yield path
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()


def test_run_on_scheduler_and_worker_processes(
    scheduler_file: Path, small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """`dask-infer run --scheduler-file` in a subprocess, on a cluster of `dask` CLI processes."""
    out, summary = tmp_path / "out.zarr", tmp_path / "summary.json"
    proc = _cli(
        "run",
        "--input",
        str(small_dataset),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        str(small_weights),
        "--scheduler-file",
        str(scheduler_file),
        "--chunk-size",
        "32",
        "--no-progress",
        "--summary",
        str(summary),
    )
    assert proc.returncode == 0, proc.stderr
    address = json.loads(scheduler_file.read_text())["address"]
    assert address.startswith("tcp://127.0.0.1:")
    record = json.loads(summary.read_text())
    assert record["cluster"] == f"scheduler {address}" and record["workers"] == 1 and record["images"] == 200
    images = zarr.open_group(str(small_dataset), mode="r")["images"][:]
    assert_close_logits(
        xr.open_zarr(out)["logits"].values, reference_logits(images, "resnet18", str(small_weights))
    )


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 256 digits at 32x32 (gray), chunks of 32, with ``label`` and ``held_out``."""
    path = tmp_path_factory.mktemp("digits") / "digits.zarr"
    write_sample(str(path), kind="digits", size=32, count=256, chunk=32)
    return path


def test_run_bf16_from_the_command_line(
    scheduler_file: Path, digits_store: Path, digits_weights: Path, tmp_path: Path
) -> None:
    """`--compress bf16 --calibration-images 8` reach the workers and the output's attrs."""
    out = tmp_path / "out.zarr"
    proc = _cli(
        "run",
        "--input",
        str(digits_store),
        "--output",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        str(digits_weights),
        "--scheduler-file",
        str(scheduler_file),
        "--compress",
        "bf16",
        "--calibration-images",
        "8",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    ds = xr.open_zarr(out)
    assert json.loads(ds.attrs["compression"])["default"]["precision"] == "bf16"
    assert json.loads(ds.attrs["config"])["calibration_images"] == 8
    got = ds["logits"].values
    images = zarr.open_group(str(digits_store), mode="r")["images"][:]
    fp32 = reference_logits(images, "resnet18", str(digits_weights))
    # bf16 keeps 8 bits of mantissa: 0.6% of the largest logit measured on these digits, 2% allowed.
    assert_close_logits(got, fp32, rel=2e-2)
    # The fp32 model misses at most 3 of the 61 held-out digits; bf16 at most 2 more (none seen).
    assert_held_out_mistakes(ds, got, fp32, held_out=61)


# --- a cluster that speaks only TLS ---------------------------------------------------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A `dask` CLI process of its own session (so :func:`_stop` reaches its children), logging to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Certificates]]:
    """`dask scheduler` and `dask worker` on 127.0.0.1 speaking only TLS, with certificates made here.

    The commands are the README's, with port 0 so tests never collide.
    """
    from distributed import Client
    from distributed.security import Security

    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder / "certs")
    path = folder / "scheduler.json"
    bind = ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"]
    procs = [
        _spawn(
            [
                "scheduler",
                "--protocol",
                "tls",
                "--port",
                "0",
                *bind,
                *certs.flags(),
                "--scheduler-file",
                str(path),
            ],
            folder / "scheduler.log",
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not path.is_file() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (folder / "scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(path.read_text())["address"]
        procs.append(
            _spawn(["worker", address, "--nthreads", "2", *bind, *certs.flags()], folder / "worker.log")
        )
        security = Security(
            tls_ca_file=str(certs.ca),
            tls_client_cert=str(certs.cert),
            tls_client_key=str(certs.key),
            require_encryption=True,
        )
        with Client(address, security=security, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
            workers = scheduler_workers(client)
            served = [*workers, *(w["nanny"] for w in workers.values())]
        assert all(a.startswith("tls://127.0.0.1:") for a in served), served
        yield address, certs
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _run_small(
    address: str, dataset: Path, weights: Path, out: Path, *extra: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """`dask-infer run` of the small ResNet-18 on the scheduler at ``address``, ``env`` added."""
    args = ["run", "--input", str(dataset), "--output", str(out), "--model", "resnet18"]
    args += ["--weights", str(weights), "--scheduler", address, "--chunk-size", "32", "--no-progress", *extra]
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def _assert_reference(out: Path, dataset: Path, weights: Path) -> None:
    images = zarr.open_group(str(dataset), mode="r")["images"][:]
    assert_close_logits(
        xr.open_zarr(out)["logits"].values, reference_logits(images, "resnet18", str(weights))
    )


def test_run_on_a_tls_cluster(
    tls_cluster: tuple[str, Certificates], small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """`--scheduler tls://... --tls-ca-file --tls-cert --tls-key` runs; without them, one line and exit 2."""
    address, certs = tls_cluster
    assert address.startswith("tls://127.0.0.1:")
    out, summary = tmp_path / "out.zarr", tmp_path / "summary.json"
    proc = _run_small(address, small_dataset, small_weights, out, *certs.flags(), "--summary", str(summary))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(summary.read_text())
    assert record["cluster"] == f"scheduler {address}" and record["workers"] == 1 and record["images"] == 200
    _assert_reference(out, small_dataset, small_weights)

    bare = _run_small(address, small_dataset, small_weights, tmp_path / "bare.zarr")
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert bare.stderr.strip().splitlines() == [
        f"error: scheduler {address!r} needs TLS but no --tls-ca-file or --tls-cert is set; give "
        "--tls-ca-file, --tls-cert and --tls-key (PEM files), or set distributed.comm.tls.ca-file, "
        ".client.cert and .client.key in dask's config"
    ]
    assert not (tmp_path / "bare.zarr").exists()


def test_tls_certificates_from_dask_config(
    tls_cluster: tuple[str, Certificates], small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """No TLS options: dask's distributed.comm.tls config (here from its environment variables) applies."""
    address, certs = tls_cluster
    env = {
        "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(certs.ca),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(certs.cert),
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(certs.key),
    }
    proc = _run_small(address, small_dataset, small_weights, tmp_path / "out.zarr", **env)
    assert proc.returncode == 0, proc.stderr
    _assert_reference(tmp_path / "out.zarr", small_dataset, small_weights)


def test_tls_cluster_refuses_a_certificate_from_another_ca(
    tls_cluster: tuple[str, Certificates], small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    address, _ = tls_cluster
    stranger = make_certificates(tmp_path / "stranger")
    out = tmp_path / "out.zarr"
    proc = _run_small(address, small_dataset, small_weights, out, *stranger.flags())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the Dask scheduler at {address!r}")
    assert "check --tls-ca-file, --tls-cert and --tls-key" in lines[0] and not out.exists()


def test_worker_over_its_memory_limit_is_one_line(
    small_dataset: Path, small_weights: Path, tmp_path: Path
) -> None:
    """A local worker whose memory limit is below what torch and the model need is restarted by its
    nanny before any task: the run ends with one line saying so and what to do, exit 2."""
    out = tmp_path / "out.zarr"
    proc = _cli(
        "run", "--input", str(small_dataset), "--output", str(out), "--model", "resnet18",
        "--weights", str(small_weights), "--workers", "1", "--memory-limit", "300MB", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr
    assert "was restarted by its nanny" in errors[0] and "of its 286.10 MiB memory limit" in errors[0]
    assert "(--memory-limit for a local cluster" in errors[0]
