#!/usr/bin/env bash
# GPU serving benchmarks (docs/performance.md). Usage: MODELS="llama-3.2-1b llama-3.1-8b" bash benchmarks/run_gpu_bench.sh
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cd /tmp
for m in ${MODELS:-llama-3.2-1b}; do
  for low in ${LOWERINGS:-cudagraph}; do
    timeout ${BENCH_TIMEOUT:-280} python /work/main/benchmarks/bench_decode.py --model "$m" --lowering "$low" \
      --batches ${BATCHES:-1,8,32,64} --ctx ${CTX:-512} --cb-requests ${CB:-0} --max-batch-size ${MAXBS:-0} ${DECODE_ARGS:-} --json "$OUT/decode_${m}_${low}.json" 2>&1 \
      | grep -v "^W1\|warn" | tee "$OUT/decode_${m}_${low}.log" | tail -25
  done
done
