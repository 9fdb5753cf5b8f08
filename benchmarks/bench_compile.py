"""Compile time, cold and with a warm compile cache, for a builtin config (in one process, after the model is
built): ``python benchmarks/bench_compile.py --model llama-3.1-8b --lowering cudagraph``."""

import argparse
import json
import tempfile
import time

import torch

import autodeploy
from autodeploy.models.builtin import build_builtin


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--lowering", default="cudagraph")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_builtin(args.model, dtype=dtype, device=device)
    build = time.perf_counter() - t0
    cache = args.cache_dir or tempfile.mkdtemp()
    times = {}
    for name in ("cold", "warm"):
        t0 = time.perf_counter()
        cm = autodeploy.compile(model, max_batch_size=64, max_seq_len=2048, lowering=args.lowering, cache_dir=cache)
        out = cm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times[name] = {"compile_s": cm.report.stage_seconds, "total_s": time.perf_counter() - t0,
                       "cache_hit": bool(cm.report.cache_hit), "tokens": out[0]}
        del cm
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"model": args.model, "model_build_s": build, **times}, indent=1, default=str))
    for name, t in times.items():
        print(f"{name}: compile+first generate {t['total_s']:.1f} s, cache hit {t['cache_hit']}, "
              f"stages " + ", ".join(f"{k} {v:.1f}s" for k, v in t["compile_s"].items()))


if __name__ == "__main__":
    main()
