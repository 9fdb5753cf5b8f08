#!/usr/bin/env bash
# GPU checks on the H100: install the project over the image's torch, run the GPU-marked tests, then the
# attention microbenchmark. Results land in $OUT (or ./bench_out).
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Running pip" | tail -15; (cd /tmp && python -c "import autodeploy, autodeploy.backends; print(autodeploy.__file__)")
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
export TRITON_INTERPRET=0
timeout ${TEST_TIMEOUT:-420} python -m pytest -q -m gpu ${GPU_TESTS:-tests/} --tb=short -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
timeout ${BENCH_TIMEOUT:-150} python benchmarks/bench_triton_attention.py ${BENCH_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" | tail -30
