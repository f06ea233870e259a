#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, run the GPU tests and the GPU benchmark.
# Prepare here:  ../shared/tools/gpu-wheels.sh torchao==0.18.0 safetensors==0.8.0 fsspec==2026.9.0
# Run there (carry .whl):  bash benchmarks/gpu_session.sh "$OUT"
# The benchmark skips optional variants once GPU_BENCH_BUDGET_S seconds have passed since it started;
# its core measurements alone took about 120 s with ResNet-50 on an H100, and each optional variant
# asks for 40-120 s more: a budget of 170 s skipped two 90 s variants.
# Tests print one line each (-v): a run cut off by GPU_TESTS_S still shows which passed.
# Writes nvidia-smi.csv, gpu-tests.log, gpu_throughput.json and gpu_throughput.log under the folder given.
set -uo pipefail
out=${1:-/tmp/dask-infer-gpu}
tests_s=${GPU_TESTS_S:-170}
budget_s=${GPU_BENCH_BUDGET_S:-300}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DASK_INFER_TEST_CACHE=/tmp/dask-infer-test-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
start=$(date +%s)
timeout "$tests_s" python3 -m pytest -v -ra -m gpu tests/workflows/test_gpu.py tests/workflows/test_fold.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} -p no:cacheprovider 2>&1 | tail -n 40 > "$out/gpu-tests.log"
echo "gpu tests: $(( $(date +%s) - start )) s" >> "$out/gpu-tests.log"
tail -n 3 "$out/gpu-tests.log"
timeout "${GPU_BENCH_TIMEOUT_S:-400}" python3 benchmarks/gpu_throughput.py --budget-s "$budget_s" --json "$out/gpu_throughput.json" \
  ${GPU_BENCH_ARGS:-} > "$out/gpu_throughput.log" 2>&1
echo "benchmark exit $?"
grep -v "^  " "$out/gpu_throughput.log" | grep -iv "warn" | tail -n 60
