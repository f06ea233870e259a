#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, run the GPU tests and the GPU benchmark.
# Prepare here:  ../shared/tools/gpu-wheels.sh torchao==0.18.0 safetensors==0.8.0 fsspec==2026.9.0
# Run there (carry .whl):  bash benchmarks/gpu_session.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/dask-infer-gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -n 30 > "$out/gpu-tests.log"
timeout 420 python3 benchmarks/gpu_throughput.py --json "$out/gpu_throughput.json" 2>&1 | tail -n 60 > "$out/gpu_throughput.log"
cat "$out/gpu_throughput.json" 2>/dev/null || tail -n 20 "$out/gpu_throughput.log"
