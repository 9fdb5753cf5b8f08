"""Does prefetching weights into L2 from a side stream fill the idle HBM time of a batch-1 decode step?

A batch-1 decode step is a chain of short kernels; between and during the small ones HBM sits idle. The idea
tested here: a prefetch kernel on a side stream, ordered after a point of the main chain, reads the weights of a
GEMM a little later in the chain into L2 (evict-last) during those gaps. Measured on H100 (Llama-1B): every
schedule and mode was slower than no prefetch (1.24-1.47 ms vs 1.12-1.14 ms), so nothing of it is in the
library. Prefetch modes: ``load`` (int32 loads with an evict-last hint, summed into a value that is never
stored: natural back-pressure), ``line`` (one ``prefetch.global.L2::evict_last`` per 128-byte line), ``bulk``
(Hopper ``cp.async.bulk.prefetch.L2``, 4 KB per thread).

Models one batch-1 decode step of a Llama config with the production kernels (PDL norms, cuBLAS/skinny GEMMs,
gated activation; two norm launches stand in for the attention and its merge) captured in one CUDA graph, and
times it with side-stream prefetch schedules: at a point of a layer (before its qkv, o, gate_up or down GEMM)
the side stream starts reading named weights of this or the next layer into L2. Every variant's logits are
checked against the same chain without prefetch (bit for bit: prefetch changes no value).

Usage: python benchmarks/bench_l2_prefetch.py [--model llama-3.2-1b] [--reps 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import copy_bandwidth, time_cuda  # noqa: E402

PREFETCH_MODES = {"load": 0, "line": 1, "bulk": 2}
_BULK_BYTES = 4096


@triton.jit
def _l2_prefetch_kernel(src_ptr, n, sink_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """Program p touches int32 elements ``[p * CHUNK, (p + 1) * CHUNK)`` of ``src`` (``n`` in all)."""
    base = tl.program_id(0).to(tl.int64) * CHUNK
    if MODE == 0:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for s in range(0, CHUNK, BLOCK):
            offs = base + s + tl.arange(0, BLOCK)
            acc += tl.load(src_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
        tot = tl.sum(acc)
    elif MODE == 1:
        offs = tl.minimum(base + tl.arange(0, CHUNK // 32) * 32, n - 1)
        r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [src_ptr + offs], dtype=tl.int32, is_pure=False, pack=1)
        tot = tl.sum(r)
    else:
        offs = tl.minimum(base + tl.arange(0, CHUNK // 1024) * 1024, n - 1024)
        r = tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], 4096;\n\tmov.u32 $0, 0;", "=r,l",
                                      [src_ptr + offs], dtype=tl.int32, is_pure=False, pack=1)
        tot = tl.sum(r)
    if tot == 0x5EED1:  # a data-dependent store keeps the loads from being optimised away
        tl.store(sink_ptr, tot)


_SINKS: dict[torch.device, torch.Tensor] = {}


def _sink(device: torch.device) -> torch.Tensor:
    """A word per device that a prefetch writes only if its checksum hits a magic value (rarely, harmlessly)."""
    if device not in _SINKS:
        _SINKS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _SINKS[device]


def l2_prefetch(t: torch.Tensor, mode: str = "load", chunk_bytes: int = 32768) -> None:
    """Read contiguous ``t`` into L2 (asynchronously, on the current stream)."""
    if not t.is_contiguous() or (t.numel() * t.element_size()) % 4:
        raise ValueError("l2_prefetch needs a contiguous tensor of a whole number of 4-byte words")
    flat = t.view(-1).view(torch.int32)
    n = flat.numel()
    if mode == "bulk" and n * 4 < _BULK_BYTES:
        mode = "line"
    chunk = chunk_bytes // 4
    sink = _sink(t.device)
    _l2_prefetch_kernel[(triton.cdiv(n, chunk),)](flat, n, sink, CHUNK=chunk, BLOCK=min(chunk, 1024),
                                                   MODE=PREFETCH_MODES[mode], num_warps=4)


# schedule name -> {trigger point: [(weight, layer offset), ...]}
SCHEDULES = {
    "none": {},
    "o+down@qkv": {"qkv": [("o", 0), ("down", 0)]},
    "o+down@qkv,qkv'@down": {"qkv": [("o", 0), ("down", 0)], "down": [("qkv", 1)]},
    "o@qkv,down@o,qkv'@down": {"qkv": [("o", 0)], "o": [("down", 0)], "down": [("qkv", 1)]},
    "down@qkv,o@qkv,qkv'@gu": {"qkv": [("down", 0), ("o", 0)], "gate_up": [("qkv", 1)]},
    "o+down@qkv,qkv'+o'@down": {"qkv": [("down", 0)], "down": [("qkv", 1), ("o", 1)]},
}


def build(model: str):
    from autodeploy.models.builtin import BUILTIN_CONFIGS

    c = BUILTIN_CONFIGS[model]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = c.get("head_dim", h // c["num_attention_heads"])
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    dt = torch.bfloat16

    def w(n, k):
        return torch.randn(n, k, device="cuda", dtype=dt) / k**0.5

    def ln(n):
        return 1 + 0.1 * torch.randn(n, device="cuda", dtype=dt)

    ws = [dict(qkv=w(qkv, h), o=w(h, c["num_attention_heads"] * d), gate_up=w(2 * inter, h), down=w(h, inter),
               ln1=ln(h), ln2=ln(h)) for _ in range(layers)]
    return c, ws, w(c["vocab_size"], h), ln(h)


def make_step(c, ws, lm, lnf, x0, small, schedule, mode, side):
    from torch.nn.functional import linear

    from autodeploy.backends.triton.kernels.gated_act import gated_act
    from autodeploy.backends.triton.kernels.gemv import gemv
    from autodeploy.backends.triton.kernels.rms_norm import fused_add_rms_norm, rms_norm

    inter = c["intermediate_size"]
    attn_w = ws[0]["o"].shape[1]

    def lin_small(x, w):
        return linear(x, w) if small == "cublas" else gemv(x, w)

    def point(name, i):
        todo = [ws[i + off][wname] for wname, off in schedule.get(name, []) if i + off < len(ws)]
        if not todo:
            return
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for t in todo:
                l2_prefetch(t, mode)

    def step():
        main = torch.cuda.current_stream()
        x, res = x0, torch.zeros_like(x0)
        for i, L in enumerate(ws):
            h, res = fused_add_rms_norm(x, res, L["ln1"], 1e-5)
            point("qkv", i)
            qkv = lin_small(h, L["qkv"])
            a = rms_norm(rms_norm(qkv[:, :attn_w], None, 1e-5), None, 1e-5)  # stands in for attention + merge
            point("o", i)
            o = lin_small(a, L["o"])
            h2, res = fused_add_rms_norm(o, res, L["ln2"], 1e-5)
            point("gate_up", i)
            gu = gemv(h2, L["gate_up"])
            act = gated_act(gu[:, :inter], gu[:, inter:])
            point("down", i)
            x = lin_small(act, L["down"])
        h, _ = fused_add_rms_norm(x, res, lnf, 1e-5)
        out = gemv(h, lm)
        if schedule:
            main.wait_stream(side)
        return out

    return step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--modes", nargs="+", default=["load", "line", "bulk"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    bw = copy_bandwidth(1 << 30, reps=10) * 1e9
    c, ws, lm, lnf = build(args.model)
    nbytes = (sum(t.numel() for L in ws for t in L.values()) + lm.numel()) * 2
    floor = nbytes / bw * 1e6
    print(f"{args.model}: copy bandwidth {bw / 1e9:.0f} GB/s, weights {nbytes / 1e9:.2f} GB, floor {floor:.0f} us",
          flush=True)
    x0 = torch.randn(1, c["hidden_size"], device="cuda", dtype=torch.bfloat16)
    rows, refs = [], {}
    for prio in (False, True):
        main_stream = torch.cuda.Stream(priority=-1 if prio else 0)
        side = torch.cuda.Stream(priority=0)
        combos = [("none", "cublas", "-"), ("none", "gemv", "-")]
        combos += list(itertools.product([k for k in SCHEDULES if k != "none"], ["cublas", "gemv"], args.modes))
        for sched, small, mode in combos:
            step = make_step(c, ws, lm, lnf, x0, small, SCHEDULES[sched], mode, side)
            name = f"{sched} | small={small} | {mode} | prio={int(prio)}"
            try:
                with torch.cuda.stream(main_stream):
                    step()
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                out = {}
                with torch.cuda.graph(g, stream=main_stream):
                    out["y"] = step()
                g.replay()
                torch.cuda.synchronize()
            except Exception as exc:  # a mode the toolchain cannot compile is reported and skipped
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                continue
            y = out["y"].float()
            key = small
            if key not in refs:
                refs[key] = y.clone()
            same = bool(torch.equal(y, refs[key]))
            us = time_cuda(g.replay, args.reps, 5) * 1e3
            rows.append(dict(model=args.model, schedule=sched, small=small, mode=mode, prio=prio,
                             us=us, floor_us=floor, bit_exact=same))
            print(f"{name:70s} {us:8.1f} us ({100 * floor / us:4.1f}% of floor)  exact={same}", flush=True)
            del g, out
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_gb_s=bw / 1e9, floor_us=floor, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
