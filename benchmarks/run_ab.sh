#!/usr/bin/env bash
# Side-by-side regression check of two source trees in one GPU session: each tree is installed in turn and runs
# the same decode and mixed-step benchmarks; the runs alternate (A B A B) so drift shows as spread, not as a gap.
# Usage: bash benchmarks/run_ab.sh TREE_A TREE_B   (e.g. an exported older commit and .)
# Env: MODELS (default llama-3.2-1b), BATCHES, ROUNDS (default 2), MIXED_ARGS, OUT.
set -uo pipefail
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd)
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); RAW=$(mktemp -d)
export PYTHONUNBUFFERED=1
for round in $(seq 1 "${ROUNDS:-2}"); do
  for tree in "$A" "$B"; do
    tag=$( [ "$tree" = "$A" ] && echo A || echo B )
    (cd "$tree" && python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1)
    for m in ${MODELS:-llama-3.2-1b}; do
      (cd /tmp && timeout ${BENCH_TIMEOUT:-240} python "$tree/benchmarks/bench_decode.py" --model "$m" --decode-only \
        --batches ${BATCHES:-1,8,64} --ctx ${CTX:-512} --json "$RAW/decode_${m}_${tag}${round}.json" 2>&1 \
        | grep -v "^W1\|warn" | tail -${TAIL:-6})
      (cd /tmp && timeout ${BENCH_TIMEOUT:-240} python "$tree/benchmarks/bench_mixed.py" --model "$m" \
        --lowerings cudagraph ${MIXED_ARGS:---decodes 0,64 --prefills 16,512 --reps 9 --ctx 256} \
        --json "$RAW/mixed_${m}_${tag}${round}.json" 2>&1 | grep -v "^W1\|warn" | tail -${TAIL:-6})
    done
  done
done
# One table: each cell's median per tree over the rounds, and B / A.
python - "$RAW" "$OUT/ab_summary.json" <<'PY'
import glob, json, re, statistics, sys
raw, out = sys.argv[1], sys.argv[2]
cells = {}
for path in sorted(glob.glob(f"{raw}/*.json")):
    kind, model, tag = re.match(r".*/(decode|mixed)_(.+)_([AB])\d+\.json", path).groups()
    res = json.load(open(path))
    if kind == "decode":
        for r in res["decode"]:
            cells.setdefault((model, f"decode b={r['batch']} ctx={r['ctx']}"), {}).setdefault(tag, []).append(r["step_ms"])
    else:
        for r in res["steps"]:
            cells.setdefault((model, f"mixed {r['decodes']}+{r['prefill']}"), {}).setdefault(tag, []).append(
                r["wall_ms"]["cudagraph"])
rows = []
print(f"{'model':<14} {'cell':<24} {'A ms (runs)':>22} {'B ms (runs)':>22} {'B/A':>6}")
for (model, cell), v in cells.items():
    a, b = v.get("A", []), v.get("B", [])
    ma, mb = (statistics.median(x) if x else float("nan") for x in (a, b))
    rows.append(dict(model=model, cell=cell, A=a, B=b, ratio=mb / ma))
    fmt = lambda xs: "/".join(f"{x:.2f}" for x in xs)
    print(f"{model:<14} {cell:<24} {fmt(a):>22} {fmt(b):>22} {mb / ma:6.3f}")
json.dump(rows, open(out, "w"), indent=1)
PY
