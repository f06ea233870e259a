#!/usr/bin/env bash
# One call on a GPU machine: install the carried wheels, run the GPU tests and the GPU benchmark.
# Prepare here:  ../shared/tools/gpu-wheels.sh torchao==0.18.0 safetensors==0.8.0 fsspec==2026.9.0
# Run there (carry .whl):  bash benchmarks/gpu_session.sh "$OUT"
# The benchmark skips optional variants once GPU_BENCH_BUDGET_S seconds have passed since it started;
# its core measurements alone took about 120 s with ResNet-50 on an H100, and each optional variant
# asks for 40-120 s more: a budget of 170 s skipped two 90 s variants.
# Tests print one line each (-v): a run cut off by GPU_TESTS_S still shows which passed.
# GPU_TESTS_S=0 skips the tests and GPU_BENCH_TIMEOUT_S=0 the benchmark.
# Writes nvidia-smi.csv, gpu-tests.log, gpu_throughput.json and gpu_throughput.log under the folder given
# (and lscpu.txt, cpu_compressed.json and cpu_compressed.log with CPU_CHECK_S).
set -uo pipefail
out=${1:-/tmp/dask-infer-gpu}
tests_s=${GPU_TESTS_S:-170}
budget_s=${GPU_BENCH_BUDGET_S:-300}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DASK_INFER_TEST_CACHE=/tmp/dask-infer-test-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>&1
bench_s=${GPU_BENCH_TIMEOUT_S:-400}
if [ "$tests_s" -gt 0 ]; then
  start=$(date +%s)
  timeout "$tests_s" python3 -m pytest -v -ra -m gpu tests/workflows/test_gpu.py tests/workflows/test_fold.py ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} -p no:cacheprovider 2>&1 | tail -n 40 > "$out/gpu-tests.log"
  echo "gpu tests: $(( $(date +%s) - start )) s" >> "$out/gpu-tests.log"
  tail -n 3 "$out/gpu-tests.log"
fi
if [ "$bench_s" -gt 0 ]; then
  timeout "$bench_s" python3 benchmarks/gpu_throughput.py --budget-s "$budget_s" --json "$out/gpu_throughput.json" \
    ${GPU_BENCH_ARGS:-} > "$out/gpu_throughput.log" 2>&1
  echo "benchmark exit $?"
  grep -v "^  " "$out/gpu_throughput.log" | grep -iv "warn" | tail -n 60
fi
# Optional: issue 12's CPU figures on this host's CPU, on two of its cores with the GPU hidden
# (CPU_CHECK_S seconds at most; off by default).
if [ "${CPU_CHECK_S:-0}" -gt 0 ]; then
  lscpu > "$out/lscpu.txt" 2>&1
  CUDA_VISIBLE_DEVICES="" timeout "$CPU_CHECK_S" taskset -c 0,1 python3 benchmarks/cpu_compressed.py \
    --recipes "${CPU_CHECK_RECIPES:-bf16+channels_last+compile}" --images 256 --passes 1 --quick \
    --json "$out/cpu_compressed.json" > "$out/cpu_compressed.log" 2>&1
  echo "cpu check exit $?"
  grep -v "^  " "$out/cpu_compressed.log" | grep -iv "warn" | tail -n 8
fi
