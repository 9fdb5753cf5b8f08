"""Host time per launch of what an uncaptured step (or a piecewise step's eager attention) calls, on tiny inputs
so the GPU keeps up: Triton kernels through the JIT entry point (few vs many arguments), the attention op as the
graph calls it, a CUDA-graph replay, and torch baselines. Usage: python benchmarks/diag_launch_overhead.py"""

from __future__ import annotations

import time

import torch


def host_us(fn, n: int = 2000) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    from autodeploy.backends.triton.kernels.attention import context_attention
    from autodeploy.backends.triton.kernels.rms_norm import rms_norm
    from autodeploy.backends.triton.kernels.rope_cache import rope_and_cache_write
    from autodeploy.backends.triton.ops import _paged_attention

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(16, 2048, device=dev, dtype=dt)
    w = torch.ones(2048, device=dev, dtype=dt)
    hq, hkv, d, page = 32, 8, 128, 64
    q = torch.randn(16, hq, d, device=dev, dtype=dt)
    k = torch.randn(16, hkv, d, device=dev, dtype=dt)
    v = torch.randn(16, hkv, d, device=dev, dtype=dt)
    cos = torch.ones(16, d, device=dev, dtype=dt)
    sin = torch.zeros(16, d, device=dev, dtype=dt)
    kc = torch.zeros(4, page, hkv, d, device=dev, dtype=dt)
    vc = torch.zeros_like(kc)
    cu = torch.tensor([0, 16], device=dev, dtype=torch.int32)
    kv = torch.tensor([16], device=dev, dtype=torch.int32)
    pt = torch.tensor([[0]], device=dev, dtype=torch.int32)
    slots = torch.arange(16, device=dev)
    out = torch.empty_like(q)
    info = torch.tensor([1, 16, 0, 16], dtype=torch.int32)
    rows = {
        "torch.empty": lambda: torch.empty(16, hq, d, device=dev, dtype=dt),
        "narrow": lambda: q.narrow(0, 0, 8),
        "copy_ (16 x 4096)": lambda: out.copy_(q),
        "rms_norm (Triton, 6 args)": lambda: rms_norm(x, w, 1e-5),
        "rope_and_cache_write (Triton)": lambda: rope_and_cache_write(q, k, v, cos, sin, kc, vc, slots),
        "context_attention (Triton, 30 args)": lambda: context_attention(
            q, kc, vc, cu, kv, pt, out, num_seqs=1, max_q_len=16, scale=0.1, sliding_window=None,
            logit_softcap=None, sinks=None),
        "attention op, prefill-only step": lambda: _paged_attention(
            q, k, v, cos, sin, kc, vc, cu, kv, pt, slots, info, [], 0.1, None, None, None),
    }
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        rms_norm(x, w, 1e-5)
        g.capture_begin()
        rms_norm(x, w, 1e-5)
        g.capture_end()
    torch.cuda.current_stream().wait_stream(s)
    rows["CUDAGraph.replay (1 kernel)"] = g.replay
    for name, fn in rows.items():
        print(f"{name:40s} {host_us(fn):8.1f} us host per call", flush=True)


if __name__ == "__main__":
    main()
