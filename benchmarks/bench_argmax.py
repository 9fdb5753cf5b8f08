"""Greedy pick over the vocabulary: torch.argmax vs the chunked argmax kernels (backends/triton/kernels/argmax.py).

Times each as a CUDA-graph replay of 20 calls (so launch overhead is not what is measured) and checks that both
agree. Usage: python benchmarks/bench_argmax.py [--vocab 128256] [--batches 1,8,64] [--chunks 1024,2048,4096]
"""

from __future__ import annotations

import argparse

import torch

from autodeploy.backends.triton.kernels.argmax import chunked_argmax


def time_graph(fn, reps: int = 20, iters: int = 50) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph of ``reps`` calls."""
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--chunks", default="4096", help="first-stage chunk sizes to compare (powers of two)")
    args = p.parse_args()
    import autodeploy.backends.triton.kernels.argmax as am

    for b in (int(x) for x in args.batches.split(",")):
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(b, args.vocab, device="cuda").to(dtype)
            t_torch = time_graph(lambda: x.argmax(-1))
            cells = []
            for chunk in (int(c) for c in args.chunks.split(",")):
                am._CHUNK = chunk
                assert torch.equal(chunked_argmax(x), x.argmax(-1))
                t_ours = time_graph(lambda: chunked_argmax(x))
                cells.append(f"chunk {chunk} {t_ours:6.2f} us ({t_torch / t_ours:.1f}x)")
            print(f"batch {b:3d} {str(dtype):15s} torch.argmax {t_torch:7.2f} us  " + "  ".join(cells))


if __name__ == "__main__":
    main()
