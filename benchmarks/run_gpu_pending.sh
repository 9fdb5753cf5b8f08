#!/usr/bin/env bash
# GPU checks and timings that CPU-only work leaves pending, in as few device calls as possible (what the docs
# quote). PART=merge: the decode split merge, reduction kernel against the opt-in ticket (1B, batch 1-256).
# PART=cb: 8B continuous batching, 1,024 x (128 in, 128 out), at max batch 1,024 and 512, fp8 beside bf16.
# PART=short: the short-context decode launch's GPU test, then FP8 CB with fp8 KV and 16,384-token steps, the
# shipped launch beside the old 4-warp one (AUTODEPLOY_DECODE_CONFIG=64,4,5).
# PART=separate: the decode tokens' RoPE + cache write ahead of the split kernel against the fused launch (GPU
# tests, one layer's launch on bf16 and FP8 caches, 8B FP8 CB at 16,384-token steps; CB_KV="auto fp8" adds FP8 KV;
# NEW_TOKEN_MODES lists new-token:merge modes, e.g. "auto:auto auto:reduce"; MERGE_AB=1 repeats the launch
# timings with the reduction-kernel merge).
# PART=pages: one layer's decode kernel over bf16 and FP8 caches at page sizes 64/32/16 and register caps.
# PART=kv_cb: 8B FP8 CB (16,384-token steps) with bf16 and FP8 KV, and 8B batch 64 context 4,096 decode steps.
# PART=blocks: the block decode kernel (each warp owning key blocks): the attention GPU tests forced onto it, then
# one layer's launch over bf16 and FP8 caches, its configs (BLOCKS_CONFIGS) beside the tiled kernel's.
# Each part fits one device call; results (logs, JSON) in $OUT.
# Usage (device tool): PART=merge bash benchmarks/run_gpu_pending.sh, then PART=cb ...
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
quiet() { grep -v "^W1\|warn"; }
if [ "${PART:-merge}" = blocks ]; then
  AUTODEPLOY_DECODE_KERNEL=blocks timeout 200 python -m pytest -q -m gpu -p no:warnings tests/test_triton_attention.py \
    -k "${TESTS:-gpu_bf16_sweep or short_context}" > "$OUT/blocks_tests.log" 2>&1; tail -3 "$OUT/blocks_tests.log"
  timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_kv_fp8_decode.py --cases ${CASES:-1024x200,64x4096,256x200} \
    --waves 2 --reps 10 --kinds bf16,fp8 --configs ${CONFIGS:-64/2/5,64/4/5} \
    --blocks-configs ${BLOCKS_CONFIGS:-16/4/4/3,16/4/4/4,32/4/4/3,32/2/2/3,16/8/8/3,32/8/8/2,64/2/2/2,64/4/4/2} \
    --json "$OUT/blocks.json" 2>&1 | quiet > "$OUT/blocks.log"
  grep -E "best|B=|rror|skip" "$OUT/blocks.log" | cut -c1-200
elif [ "${PART:-merge}" = pages ]; then  # the decode kernel over smaller pages and register caps
  while read -r ps cfgs; do
    timeout 200 python benchmarks/bench_kv_fp8_decode.py --cases ${CASES:-1024x200,64x4096} --waves 2 --reps 10 \
      --kinds bf16,fp8 --page-sizes $ps --configs $cfgs 2>&1 | quiet > "$OUT/pages_$ps.log"
    grep -E "best|B=|rror" "$OUT/pages_$ps.log"
  done <<EOF
${PAGE_RUNS:-64 64/2/5/168,64/2/3/128,64/2/5/128
32 32/2/3,32/2/5,32/4/5
16 16/2/3,16/2/5,16/4/3}
EOF
elif [ "${PART:-merge}" = kv_cb ]; then
  for run in ${CB_RUNS:-auto:64 fp8:64}; do  # kv dtype:page size
    kv=${run%%:*}; ps=${run#*:}
    timeout ${CB_TIMEOUT:-170} python benchmarks/bench_decode.py --model llama-3.1-8b --cb-only --max-batch-size 1024 \
      --cb-requests 1024 --cb-input 128 --cb-output 128 --max-seq-len 512 --quantization fp8 --kv-cache-dtype $kv \
      --page-size $ps --max-num-tokens 16384 2>&1 | quiet > "$OUT/kv_cb_${kv}_$ps.log"
    echo "== CB kv $kv page $ps"; grep -E "continuous batching|by step kind" "$OUT/kv_cb_${kv}_$ps.log" | cut -c1-900
  done
  for kv in ${LONG_KV-auto fp8}; do
    timeout 150 python benchmarks/bench_decode.py --model llama-3.1-8b --batches 64 --ctx 4096 --max-seq-len 4224 \
      --decode-only --steps 24 --kv-cache-dtype $kv 2>&1 | quiet > "$OUT/kv_long_$kv.log"
    echo "== b64 ctx4096 kv $kv"; grep -E "^ +[0-9]+ +[0-9]+ |ms" "$OUT/kv_long_$kv.log" | tail -4
  done
elif [ "${PART:-merge}" = separate ]; then
  timeout 240 python -m pytest -q -m gpu -p no:warnings tests/test_triton_attention.py tests/test_gpu.py \
    -k "${TESTS:-short_context}" > "$OUT/separate_tests.log" 2>&1
  tail -3 "$OUT/separate_tests.log"
  timeout 150 python benchmarks/bench_triton_attention.py --variants --no-main --no-sdpa --variant-tiles page \
    --variant-kv bf16,fp8 --variant-cases ${CASES:-1024x200,256x200,64x1024,64x4096,1x1024} --reps 10 2>&1 \
    | quiet > "$OUT/separate_variants.log"; grep -E "variants|rror" "$OUT/separate_variants.log"
  if [ -n "${MERGE_AB:-}" ]; then
    AUTODEPLOY_DECODE_MERGE=reduce timeout 150 python benchmarks/bench_triton_attention.py --variants --no-main \
      --no-sdpa --variant-tiles page --variant-kv bf16,fp8 \
      --variant-cases ${CASES:-1024x200,256x200,64x1024,64x4096,1x1024} \
      --reps 10 2>&1 | quiet > "$OUT/separate_variants_reduce.log"
    echo "== merge by the reduction kernel"; grep -E "variants|rror" "$OUT/separate_variants_reduce.log"
  fi
  for mode in ${NEW_TOKEN_MODES:-auto:auto fused:reduce}; do for kv in ${CB_KV:-auto}; do
    AUTODEPLOY_DECODE_NEW_TOKEN=${mode%%:*} AUTODEPLOY_DECODE_MERGE=${mode#*:} timeout ${CB_TIMEOUT:-170} \
      python benchmarks/bench_decode.py \
      --model llama-3.1-8b --cb-only --max-batch-size 1024 --cb-requests 1024 --cb-input 128 --cb-output 128 \
      --max-seq-len 512 --quantization fp8 --kv-cache-dtype $kv --max-num-tokens 16384 2>&1 | quiet \
      > "$OUT/separate_cb_${mode/:/_}_$kv.log"
    echo "== new token:merge $mode, kv $kv"
    grep -E "continuous batching|by step kind" "$OUT/separate_cb_${mode/:/_}_$kv.log" | cut -c1-900
  done; done
elif [ "${PART:-merge}" = short ]; then
  timeout 200 python -m pytest -q -m gpu -p no:warnings tests/test_triton_attention.py -k short_context 2>&1 | tail -2
  for c in "" 64,4,5; do
    AUTODEPLOY_DECODE_CONFIG=$c timeout ${CB_TIMEOUT:-170} python benchmarks/bench_decode.py --model llama-3.1-8b \
      --cb-only --max-batch-size 1024 --cb-requests 1024 --cb-input 128 --cb-output 128 --max-seq-len 512 \
      --quantization fp8 --kv-cache-dtype fp8 --max-num-tokens 16384 2>&1 | quiet > "$OUT/short_${c//,/_}.log"
    echo "== fp8 KV, launch ${c:-shipped}"; grep -E "continuous batching" "$OUT/short_${c//,/_}.log"
  done
elif [ "${PART:-merge}" = merge ]; then
  for rep in 1 2; do for mode in reduce ticket; do
    AUTODEPLOY_DECODE_MERGE=$mode timeout 100 python benchmarks/bench_decode.py --model llama-3.2-1b --decode-only \
      --steps 64 --batches ${MERGE_BATCHES:-1,32,64,256} --max-seq-len 1024 2>&1 | quiet > "$OUT/merge_1b_${mode}_$rep.log"
    echo "== $mode rep $rep"; grep -E "^ +[0-9]+ +[0-9]+ async" "$OUT/merge_1b_${mode}_$rep.log"
  done; done
else
  # name, max batch, extra flags
  while read -r name mb flags; do
    timeout ${CB_TIMEOUT:-170} python benchmarks/bench_decode.py --model llama-3.1-8b --cb-only --max-batch-size "$mb" \
      --cb-requests 1024 --cb-input 128 --cb-output 128 --max-seq-len 512 $flags --json "$OUT/cb_${name}_$mb.json" \
      2>&1 | quiet > "$OUT/cb_${name}_$mb.log"
    echo "== $name max batch $mb (rc $?)"; grep -E "compile|continuous batching|by step kind" "$OUT/cb_${name}_$mb.log"
  done <<EOF
${CB_RUNS:-fp8 1024 --quantization fp8
bf16 1024
fp8 512 --quantization fp8
fp8kv 1024 --quantization fp8 --kv-cache-dtype fp8}
EOF
fi
