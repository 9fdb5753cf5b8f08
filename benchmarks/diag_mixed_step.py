"""Where an uncaptured mixed step's wall time goes: wall vs GPU busy, then a cProfile of the host side.
Usage: python benchmarks/diag_mixed_step.py [--model llama-3.1-8b] [--decodes 255] [--prefill 300]"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_decode import mixed_chunks, mixed_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--decodes", type=int, default=255)
    p.add_argument("--prefill", type=int, default=300)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    import autodeploy
    from autodeploy.models.builtin import build_builtin

    cm = autodeploy.compile(build_builtin(args.model, dtype=torch.bfloat16, device="cuda"), max_batch_size=256,
                            max_seq_len=2048, max_num_tokens=8192)
    row = mixed_step(cm, args.decodes, args.prefill, args.ctx, cm.vocab_size)
    print(f"{args.decodes} decodes + {args.prefill}-token prefill: wall {row['wall_ms']:.2f} ms, GPU busy "
          f"{row['gpu_busy_ms']:.2f} ms", flush=True)
    chunks = mixed_chunks(cm, args.decodes, args.prefill, args.ctx, cm.vocab_size)
    for label in ("pack+forward", "forward only"):
        batch = cm.packer.pack(chunks)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        if label == "pack+forward":
            batch = cm.packer.pack(chunks)
        cm.forward(batch)
        prof.disable()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        print(f"== {label}: host (profiled) {host * 1e3:.1f} ms, to sync {total * 1e3:.1f} ms")
        print(s.getvalue()[-6000:])


if __name__ == "__main__":
    main()
