#!/usr/bin/env bash
# GPU checks on the H100: install the project over the image's torch, run the GPU-marked tests, then the
# attention microbenchmark. Results land in $OUT (or ./bench_out).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Running pip" | tail -15; (cd /tmp && python -c "import autodeploy, autodeploy.backends; print(autodeploy.__file__)")
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
export TRITON_INTERPRET=0
# Whole-model GPU tests plus every Triton kernel file (with the interpreter off they test the compiled kernels,
# including the gpu-marked bf16 sweeps).
timeout ${TEST_TIMEOUT:-540} python -m pytest -q ${GPU_TESTS:-tests/test_gpu.py tests/test_triton_attention.py \
  tests/test_triton_norm_rope.py tests/test_triton_gated_act.py tests/test_triton_gemv.py} --tb=short \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
timeout ${BENCH_TIMEOUT:-150} python benchmarks/bench_triton_attention.py ${BENCH_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -30
