#!/usr/bin/env bash
# The GPU checks and timings of the quantized kernels, the FP8-KV decode and the decode reduction, in as few device
# calls as possible (what docs/quantization.md quotes). PART=tests (about 5 min), PART=bench (about 8 min) or PART=cb (about 5 min);
# results in $OUT.
# Usage (device tool): PART=tests bash benchmarks/run_gpu_pending.sh, then PART=bench bash benchmarks/run_gpu_pending.sh
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
if [ "${PART:-tests}" = tests ]; then
  python -m autodeploy.backends.triton.compile_check --json "$OUT/compile_check.json" 2>&1 | grep -v -i warn | tail -40
  # the tiled int8 weight-only GEMM, the quantized MoE kernels (and their per-device checks), the fp8 KV decode
  # kernel's page loop (masked head/tail steps), beam search's device top-k
  timeout ${TEST_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider --tb=short \
    tests/test_quantization.py -k "int8_weight_gemm or tiled_gemm or w8a8 or llama_shapes or route_decode or gpu_fast_paths" \
    2>&1 | tee "$OUT/gpu_quant.log" | tail -15
  timeout ${TEST_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider --tb=short tests/test_moe.py \
    -k "quantized or fp8_experts or int8_weight_experts or int8_experts or checked_on_each or on_gpu" 2>&1 | tee "$OUT/gpu_moe.log" | tail -15
  timeout ${TEST_TIMEOUT:-420} python -m pytest -q -p no:cacheprovider --tb=short tests/test_triton_attention.py \
    -k "fp8_cache_page_ranges or decode_page_sizes or decode_mixed or decode_many_splits or reduce" 2>&1 \
    | tee "$OUT/gpu_attention.log" | tail -15
  timeout ${TEST_TIMEOUT:-300} python -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/test_kv_cache_fp8.py \
    tests/test_beam_search.py 2>&1 | tee "$OUT/gpu_kv_beam.log" | tail -15
elif [ "${PART}" = cb ]; then
  # FP8-KV continuous batching with the shipped prefill tile (it spills 48 B, compile_check) and the one that
  # does not spill
  for cfg in "" "128,32,8,3"; do
    AUTODEPLOY_CONTEXT_CONFIG=$cfg timeout 280 python benchmarks/bench_decode.py --model llama-3.1-8b --cb-only \
      --max-batch-size 256 --cb-requests 1024 --cb-input 128 --cb-output 128 --max-seq-len 512 --quantization fp8 \
      --kv-cache-dtype fp8 2>&1 | grep -v "^W1\|warn" | tee -a "$OUT/cb_fp8kv.log" | tail -6
  done
else
  timeout 200 python benchmarks/bench_int8w_gemm.py --rows ${ROWS:-17,32,64,128,256,512,1024} --layers 8 \
    --json "$OUT/int8w_gemm.json" 2>&1 | tee "$OUT/int8w_gemm.log" | tail -40
  timeout 150 python benchmarks/bench_moe.py --batches 1,64,256 --quant int8-weight,fp8,int8 --reps 10 \
    --json "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" | grep -v "^{" | tail -12
  timeout 120 python benchmarks/bench_kv_fp8_decode.py --cases 64x4096,16x8192 --waves 1,2 --kinds bf16,fp8 2>&1 \
    | tee "$OUT/kv_fp8.log" | tail -12
  for q in "" "--quantization int8-weight"; do
    timeout 150 python benchmarks/bench_decode.py --model llama-3.1-8b --decode-only --steps 16 --batches 32,64 \
      --max-seq-len 1024 $q 2>&1 | grep -v "^W1\|warn" | tee -a "$OUT/decode_8b_int8w.log" | tail -8
  done
fi
