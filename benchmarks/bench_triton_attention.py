"""GPU microbenchmark for the Triton paged attention kernels.

Decode (flash-decoding over the paged cache) is memory bound, so it is reported as achieved HBM bandwidth
(bytes of K+V read plus q/out) and as a fraction of a measured device-to-device copy bandwidth. Decode calls
are timed as CUDA-graph replays (as the cudagraph lowering runs them), with L2 flushed before each. Prefill
(context_attention, one causal sequence) is compute bound and reported in TFLOP/s. PyTorch SDPA on equivalent
contiguous tensors is timed alongside for reference.

Usage: python benchmarks/bench_triton_attention.py [--page-size 64] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Optional

import torch

# Llama-3-8B attention shapes
HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def time_cuda(fn, reps: int, warmup: int, flush=None) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events; ``flush()`` evicts L2 before each run)."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush()  # evict K/V from L2 so small decode cases measure HBM, not cache
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graphed(fn):
    """Capture ``fn`` in a CUDA graph and return its replay: the decode step runs this way in production
    (cudagraph lowering), and it keeps Python launch overhead (~tens of us per Triton launch) out of a kernel
    measurement that is only a few us at short contexts."""
    fn()  # compile/autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes), the practical HBM ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), reps, warmup=3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_flush(mode: str, nbytes: int = 256 << 20):
    """An L2 eviction before each timed call. ``read`` streams a buffer 5x the L2 size through it, leaving clean
    lines, as the weight reads before an attention call do in a decode step. ``write`` (the method until this
    session) zeroes the buffer, which leaves the L2 full of dirty lines: the call under test then pays for
    writing ~50 MB back to HBM while it reads, about 15 us on H100, charged to whichever kernel runs next."""
    buf = torch.ones(nbytes // 4096, 1024, dtype=torch.float32, device="cuda")
    if mode == "write":
        return buf.zero_
    # Row sums into a 256 KB vector: one pass of reads, no cross-block reduction workspace. (A whole-buffer
    # torch.sum here made the next replay of the new-token decode graph fault with an illegal address; it did
    # not reproduce under compute-sanitizer and the cause is not found, so the flush avoids that kernel.)
    sink = torch.empty(buf.shape[0], dtype=torch.float32, device="cuda")
    return lambda: torch.sum(buf, dim=1, out=sink)


def read_bandwidth(nbytes: int, reps: int) -> float:
    """Read-only streaming bandwidth in GB/s (a sum over a large buffer): the ceiling for a pure-read kernel."""
    src = torch.ones(nbytes // 4096, 1024, dtype=torch.float32, device="cuda")
    sink = torch.empty(src.shape[0], dtype=torch.float32, device="cuda")
    ms = time_cuda(lambda: torch.sum(src, dim=1, out=sink), reps, warmup=3)
    return nbytes / (ms * 1e-3) / 1e9


def make_paged(batch: int, ctx: int, page_size: int, gen: torch.Generator):
    """Random paged cache holding ``batch`` sequences of ``ctx`` tokens in shuffled pages."""
    pages_per_seq = math.ceil(ctx / page_size)
    num_pages = batch * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, HKV, D, device="cuda", dtype=DTYPE, generator=gen)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    page_table = perm.view(batch, pages_per_seq).contiguous()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, page_table, seq_lens


def gather_contiguous(cache: torch.Tensor, page_table: torch.Tensor, ctx: int) -> torch.Tensor:
    """Paged cache -> SDPA layout ``[B, Hkv, ctx, D]`` (also used to check the kernel's output)."""
    b = page_table.shape[0]
    return cache[page_table.long()].reshape(b, -1, HKV, D)[:, :ctx].transpose(1, 2).contiguous()


def _decode_case(batch: int, ctx: int, page_size: int, gen: torch.Generator, waves: float,
                 min_chunk: Optional[int] = None):
    """Paged cache, queries and the partition table (computed once, as the metadata node does per forward)."""
    from autodeploy.backends.triton.partition import MIN_CHUNK, decode_partition, device_sms, target_work_items

    k_cache, v_cache, page_table, seq_lens = make_paged(batch, ctx, page_size, gen)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    part = decode_partition(seq_lens, cu, target=target_work_items(HKV, device_sms(q.device), waves),
                            min_chunk=MIN_CHUNK if min_chunk is None else min_chunk)
    return k_cache, v_cache, page_table, seq_lens, q, cu, part


def _decode_runner(case, out, new_token=False, scales=None):
    """One layer's decode attention. ``new_token``: the production launch, which also rotates q and the new
    key (RoPE) and writes the new K/V into the cache (at each sequence's last position): True or "fused" in
    the split kernel, "separate" by the RoPE + cache-write kernel ahead of it (``new_token_mode``).
    ``scales``: (k_scale, v_scale) of an FP8 cache in ``case``."""
    from autodeploy.backends.triton.kernels.attention import NewTokenKV, decode_attention
    from autodeploy.backends.triton.kernels.rope_cache import rope_and_cache_write

    k_cache, v_cache, page_table, seq_lens, q, cu, part = case
    k_scale, v_scale = scales if scales is not None else (None, None)
    batch = q.shape[0]
    new_kv = None
    kw = dict(scale=D**-0.5, sliding_window=None, logit_softcap=None, sinks=None, cu_seqlens_q=cu, partition=part,
              k_scale=k_scale, v_scale=v_scale)
    if new_token:
        page_size = k_cache.shape[1]
        last = (seq_lens - 1).long()
        slots = page_table.long().gather(1, (last // page_size)[:, None])[:, 0] * page_size + last % page_size
        theta = torch.rand(batch, D // 2, device="cuda") * 6
        cos, sin = (torch.cat([f(theta)] * 2, -1).to(DTYPE) for f in (torch.cos, torch.sin))
        kv = torch.randn(batch, 2, HKV, D, device="cuda", dtype=DTYPE)
        new_kv = NewTokenKV(kv[:, 0], kv[:, 1], slots, cos, sin)
        if new_token == "separate":
            def run():
                q_rot = rope_and_cache_write(q, kv[:, 0], kv[:, 1], cos, sin, k_cache, v_cache, slots, k_scale,
                                             v_scale)
                decode_attention(q_rot, k_cache, v_cache, seq_lens, page_table, out, **kw)
            return run
    return lambda: decode_attention(q, k_cache, v_cache, seq_lens, page_table, out, new_kv=new_kv, **kw)


def _decode_bytes(batch: int, ctx: int) -> int:
    return 2 * batch * ctx * HKV * D * DTYPE.itemsize + 2 * batch * HQ * D * DTYPE.itemsize


def sweep_decode(args, copy_gbs: float, flush, rows: list) -> None:
    """Tune the partition size (waves) and the split kernel's tile config on the cases that need splitting."""
    import autodeploy.backends.triton.kernels.attention as attn

    default_config = attn._decode_config
    configs = [(64, 4, 3), (64, 4, 4), (64, 8, 3), (64, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 4), (32, 2, 4)]
    gen = torch.Generator(device="cuda").manual_seed(2)
    for batch, ctx in [] if args.short_only else [(1, 32768), (1, 8192), (16, 8192)]:
        results = []
        for waves in (1.0, 2.0, 4.0, 8.0):
            case = _decode_case(batch, ctx, args.page_size, gen, waves)
            out = torch.empty_like(case[4])
            for cfg in configs:
                attn._decode_config = lambda *a, _c=cfg: _c
                try:
                    ms = time_cuda(graphed(_decode_runner(case, out)), args.reps, args.warmup, flush)
                except Exception as exc:  # a config that does not compile (shared memory) is skipped
                    print(f"  skip {cfg}: {type(exc).__name__}", flush=True)
                    continue
                finally:
                    attn._decode_config = default_config
                pct = 100 * _decode_bytes(batch, ctx) / (ms * 1e-3) / 1e9 / copy_gbs
                results.append((pct, waves, cfg, ms))
                rows.append(dict(kind="decode_sweep", batch=batch, ctx=ctx, waves=waves, config=cfg, ms=ms,
                                 pct_copy_bw=pct))  # fmt: skip
            del case, out
        results.sort(reverse=True)
        top = ", ".join(f"waves={w:g} cfg={c} {p:.0f}%" for p, w, c, _ in results[:4])
        print(f"sweep   B={batch:<3d} ctx={ctx:<6d} best: {top}", flush=True)
    # Short contexts are latency bound: how finely to split them (min chunk) with the default tile config.
    for batch, ctx in [(1, 512), (1, 1024), (1, 2048), (8, 512)]:
        cells = []
        for min_chunk in (64, 128, 256, 512, 1024, 4096):
            case = _decode_case(batch, ctx, args.page_size, gen, 2.0, min_chunk)
            out = torch.empty_like(case[4])
            ms = time_cuda(graphed(_decode_runner(case, out)), args.reps, args.warmup, flush)
            items = int((case[6][1][1:] - case[6][1][:-1]).max())
            cells.append(f"min_chunk={min_chunk}: {ms * 1e3:.1f} us ({items} splits)")
            rows.append(dict(kind="decode_min_chunk", batch=batch, ctx=ctx, min_chunk=min_chunk, ms=ms))
            del case, out
        print(f"short   B={batch:<3d} ctx={ctx:<6d} " + " | ".join(cells), flush=True)


def variants_decode(args, copy_gbs: float, flush, rows: list) -> None:
    """The decode strategy switches side by side: whole-page tiles vs per-key gather, each as the plain kernel
    and as the production launch (+ RoPE and the new token's cache write, fused into the split kernel or by the
    RoPE + cache-write kernel ahead of it), on bf16 and (``--variant-kv fp8``) FP8 caches. Percentages are of
    the bf16 cache's bytes, so an FP8 row above 100% reads faster than bf16 could."""
    import autodeploy.backends.triton.kernels.attention as attn
    from autodeploy.ops.kv_quant import quantize_kv

    saved = attn.DECODE_PAGE_TILES
    gen = torch.Generator(device="cuda").manual_seed(3)
    cases = [tuple(map(int, c.split("x"))) for c in args.variant_cases.split(",")]
    tile_modes = [tiles == "page" for tiles in args.variant_tiles.split(",")]
    for batch, ctx in cases:
        case = _decode_case(batch, ctx, args.page_size, gen, 2.0)
        out = torch.empty_like(case[4])
        for kv in args.variant_kv.split(","):
            run_case, scales = case, None
            if kv == "fp8":
                (k8, ks), (v8, vs) = quantize_kv(case[0]), quantize_kv(case[1])
                run_case, scales = (k8, v8, *case[2:]), (ks, vs)
            cells = []
            for tiles in tile_modes:
                for new_token in (False, "fused", "separate"):
                    attn.DECODE_PAGE_TILES = tiles
                    try:
                        us = 1e3 * time_cuda(graphed(_decode_runner(run_case, out, new_token, scales)), args.reps,
                                             args.warmup, flush)
                    finally:
                        attn.DECODE_PAGE_TILES = saved
                    pct = 100 * _decode_bytes(batch, ctx) / (us * 1e-6) / 1e9 / copy_gbs
                    name = f"{'page' if tiles else 'gather'}{'+' + new_token if new_token else ''}"
                    cells.append((us, name, pct))
                    rows.append(dict(kind="decode_variant", batch=batch, ctx=ctx, kv=kv, variant=name, us=us,
                                     pct_copy_bw=pct))
            cells.sort()
            print(f"variants B={batch:<3d} ctx={ctx:<6d} {kv:4s} "
                  + " | ".join(f"{n} {u:.1f} us ({p:.0f}%)" for u, n, p in cells), flush=True)
        del case, out


def flush_compare(args, copy_gbs: float, rows: list) -> None:
    """The same decode calls (ours and SDPA's) timed after a write-flush and after a read-flush of L2, side by
    side, so the change of method is visible as a number rather than a claim."""
    flushes = {mode: make_flush(mode) for mode in ("write", "read")}
    gen = torch.Generator(device="cuda").manual_seed(4)
    for batch, ctx in [(1, 8192), (1, 32768), (16, 32768)]:
        case = _decode_case(batch, ctx, args.page_size, gen, 2.0)
        k_cache, v_cache, page_table, _, q, _, _ = case
        k = gather_contiguous(k_cache, page_table, ctx)
        v = gather_contiguous(v_cache, page_table, ctx)
        q4 = q.unsqueeze(2)
        fns = {"ours": graphed(_decode_runner(case, torch.empty_like(q))),
               "sdpa": graphed(lambda: torch.nn.functional.scaled_dot_product_attention(
                   q4, k, v, scale=D**-0.5, enable_gqa=True))}  # fmt: skip
        cells = []
        for name, fn in fns.items():
            for mode, flush in flushes.items():
                us = 1e3 * time_cuda(fn, args.reps, args.warmup, flush)
                pct = 100 * _decode_bytes(batch, ctx) / (us * 1e-6) / 1e9 / copy_gbs
                cells.append(f"{name}/{mode}-flush {us:.1f} us ({pct:.1f}%)")
                rows.append(dict(kind="flush_compare", batch=batch, ctx=ctx, kernel=name, flush=mode, us=us,
                                 pct_copy_bw=pct))
        print(f"flush   B={batch:<3d} ctx={ctx:<6d} " + " | ".join(cells), flush=True)
        del case, k, v, fns
    del flushes
    torch.cuda.empty_cache()


def bench_decode(args, copy_gbs: float, flush, rows: list) -> None:
    from autodeploy.backends.triton.partition import DEFAULT_WAVES

    scale = D**-0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch in args.batches:
        for ctx in args.contexts:
            case = _decode_case(batch, ctx, args.page_size, gen, DEFAULT_WAVES)
            k_cache, v_cache, page_table, seq_lens, q, _cu, part = case
            out = torch.empty_like(q)
            splits = int((part[1][1] - part[1][0]).item())
            run = _decode_runner(case, out)
            ms = time_cuda(graphed(run), args.reps, args.warmup, flush)
            nbytes = _decode_bytes(batch, ctx)
            gbs = nbytes / (ms * 1e-3) / 1e9
            row = dict(kind="decode", batch=batch, ctx=ctx, page_size=args.page_size, num_splits=splits,
                       ms=ms, gb_s=gbs, pct_copy_bw=100 * gbs / copy_gbs)  # fmt: skip
            # the production launch: + RoPE on q/k and the new token's cache write (same bytes, one launch)
            row["with_new_token_ms"] = time_cuda(graphed(_decode_runner(case, torch.empty_like(q), True)),
                                                 args.reps, args.warmup, flush)

            if not args.no_sdpa:
                k = gather_contiguous(k_cache, page_table, ctx)
                v = gather_contiguous(v_cache, page_table, ctx)
                q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
                sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    q4, k, v, scale=scale, enable_gqa=True
                )
                ref = sdpa().squeeze(2)
                run()
                row["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
                sdpa_ms = time_cuda(graphed(sdpa), args.reps, args.warmup, flush)
                row["sdpa_ms"] = sdpa_ms
                row["sdpa_gb_s"] = nbytes / (sdpa_ms * 1e-3) / 1e9
                del k, v, ref
            rows.append(row)
            print(
                f"decode  B={batch:<3d} ctx={ctx:<6d} splits={splits:<3d} {ms * 1e3:9.1f} us  "
                f"{gbs:7.0f} GB/s  {row['pct_copy_bw']:5.1f}% of copy (+rope/write {row['with_new_token_ms'] * 1e3:6.1f} us)"
                + (f" | sdpa {row['sdpa_ms'] * 1e3:9.1f} us {row['sdpa_gb_s']:7.0f} GB/s"
                   f"  err {row['max_abs_err_vs_sdpa']:.2e}" if "sdpa_ms" in row else ""),  # fmt: skip
                flush=True,
            )
            del k_cache, v_cache, page_table, seq_lens, q, out, case, part
            torch.cuda.empty_cache()


def bench_prefill_batch(args, rows: list) -> None:
    """``--prefill-batch N``: N causal prompts of ``--prefill-len`` tokens in one call (a serving step's prefill
    share), per-sequence and flat grids, under each ``--context-configs`` tile (AUTODEPLOY_CONTEXT_CONFIG)."""
    import os

    from autodeploy.backends.triton.kernels.attention import context_attention

    n, s = args.prefill_batch, args.prefill_len
    gen = torch.Generator(device="cuda").manual_seed(2)
    k_cache, v_cache, page_table, seq_lens = make_paged(n, s, args.page_size, gen)
    q = torch.randn(n * s, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    cu = torch.arange(0, n + 1, dtype=torch.int32, device="cuda") * s
    flops = n * 4 * s * s * HQ * D / 2
    for cfg in [None] + (args.context_configs.split(";") if args.context_configs else []):
        if cfg:
            os.environ["AUTODEPLOY_CONTEXT_CONFIG"] = cfg
        else:
            os.environ.pop("AUTODEPLOY_CONTEXT_CONFIG", None)
        times = {}
        for grid, mq in (("per-sequence", s), ("flat", None)):
            times[grid] = time_cuda(lambda: context_attention(
                q, k_cache, v_cache, cu, seq_lens, page_table, out, num_seqs=n, max_q_len=mq, scale=D**-0.5,
                sliding_window=None, logit_softcap=None, sinks=None), args.reps, args.warmup)
        rows.append(dict(kind="prefill_batch", seqs=n, seq_len=s, config=cfg or "default", **{
            f"{g}_us": t * 1e3 for g, t in times.items()}))
        print(f"prefill {n} x {s} tokens, config {cfg or 'default':>12}: per-sequence grid "
              f"{times['per-sequence'] * 1e3:7.1f} us, flat grid {times['flat'] * 1e3:7.1f} us "
              f"({flops / times['flat'] / 1e12:.1f} TFLOP/s)")
    os.environ.pop("AUTODEPLOY_CONTEXT_CONFIG", None)


def bench_prefill(args, rows: list) -> None:
    from autodeploy.backends.triton.kernels.attention import context_attention

    s = args.prefill_len
    scale = D**-0.5
    gen = torch.Generator(device="cuda").manual_seed(1)
    k_cache, v_cache, page_table, seq_lens = make_paged(1, s, args.page_size, gen)
    q = torch.randn(s, HQ, D, device="cuda", dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    cu = torch.tensor([0, s], dtype=torch.int32, device="cuda")

    def run():
        context_attention(q, k_cache, v_cache, cu, seq_lens, page_table, out, num_seqs=1, max_q_len=s, scale=scale,
                          sliding_window=None, logit_softcap=None, sinks=None)  # fmt: skip

    def run_flat():  # the grid of device-composed steps (whole-step CUDA graphs): sized by tokens and sequences
        context_attention(q, k_cache, v_cache, cu, seq_lens, page_table, out, num_seqs=1, scale=scale,
                          sliding_window=None, logit_softcap=None, sinks=None)  # fmt: skip

    flops = 4 * s * s * HQ * D / 2  # causal: half of the QK^T and PV products
    ms = time_cuda(run, args.reps, args.warmup)
    flat_ms = time_cuda(run_flat, args.reps, args.warmup)
    row = dict(kind="prefill", seq_len=s, page_size=args.page_size, ms=ms, tflops=flops / (ms * 1e-3) / 1e12,
               flat_grid_ms=flat_ms)
    if not args.no_sdpa:
        q4 = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, S, D]
        k = gather_contiguous(k_cache, page_table, s)
        v = gather_contiguous(v_cache, page_table, s)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q4, k, v, is_causal=True, scale=scale, enable_gqa=True
        )
        ref = sdpa()[0].transpose(0, 1)
        run()
        row["max_abs_err_vs_sdpa"] = (out.float() - ref.float()).abs().max().item()
        sdpa_ms = time_cuda(sdpa, args.reps, args.warmup)
        row["sdpa_ms"] = sdpa_ms
        row["sdpa_tflops"] = flops / (sdpa_ms * 1e-3) / 1e12
    rows.append(row)
    print(
        f"prefill S={s:<6d} causal          {ms * 1e3:9.1f} us  {row['tflops']:7.1f} TFLOP/s"
        f" (flat grid {flat_ms * 1e3:.1f} us)"
        + (f" | sdpa {row['sdpa_ms'] * 1e3:9.1f} us {row['sdpa_tflops']:7.1f} TFLOP/s"
           f"  err {row['max_abs_err_vs_sdpa']:.2e}" if "sdpa_ms" in row else ""),  # fmt: skip
        flush=True,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--page-size", type=int, default=64, help="KV cache page size (the triton backend uses 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--prefill-batch", type=int, default=0,
                   help="time only N prompts of --prefill-len tokens in one call (then exit)")
    p.add_argument("--context-configs", default="",
                   help="with --prefill-batch: tiles to compare, 'BLOCK_M,BLOCK_N,warps,stages;...'")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth-probe copy")
    p.add_argument("--no-sdpa", action="store_true", help="skip the torch SDPA reference timings")
    p.add_argument("--json", type=str, default=None, help="write the results here")
    p.add_argument("--sweep", action="store_true", help="also tune partition waves and decode tile configs")
    p.add_argument("--short-only", action="store_true", help="with --sweep: only the short-context min-chunk sweep")
    p.add_argument("--variants", action="store_true",
                   help="time the decode strategy switches (page tiles, merge placement, tile configs) side by side")
    p.add_argument("--variant-cases", default="1x1024,1x32768,16x8192,32x8192,64x1024,64x8192,128x2048",
                   help="with --variants: BATCHxCTX,...")
    p.add_argument("--variant-kv", default="bf16", help="with --variants: cache kinds, bf16,fp8")
    p.add_argument("--variant-tiles", default="gather,page", help="with --variants: key tiles, gather,page")
    p.add_argument("--no-main", action="store_true", help="skip the main decode table")
    p.add_argument("--flush", choices=("read", "write"), default="read",
                   help="how L2 is evicted before each timed decode call (see make_flush)")
    p.add_argument("--flush-compare", action="store_true",
                   help="time the batch-1 decode cases under both flush methods side by side")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_triton_attention: CUDA is not available; this benchmark needs an NVIDIA GPU.", file=sys.stderr)
        return 2

    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth(args.copy_mib << 20, reps=20)
    read_gbs = read_bandwidth(args.copy_mib << 20, reps=20)
    print(f"device: {dev}   measured D2D copy bandwidth: {copy_gbs:.0f} GB/s   read-only: {read_gbs:.0f} GB/s   "
          f"L2 flush: {args.flush}")
    flush = make_flush(args.flush)
    rows: list = []
    if args.prefill_batch:
        bench_prefill_batch(args, rows)
        args.no_main, args.variants, args.sweep, args.flush_compare = True, False, False, False
    if args.flush_compare:
        flush_compare(args, copy_gbs, rows)
    if args.variants:
        variants_decode(args, copy_gbs, flush, rows)
    if not args.no_main:
        bench_decode(args, copy_gbs, flush, rows)
    if args.sweep:
        sweep_decode(args, copy_gbs, flush, rows)
    del flush
    if not args.prefill_batch:
        bench_prefill(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, dtype=str(DTYPE), hq=HQ, hkv=HKV, head_dim=D, copy_gb_s=copy_gbs,
                           read_gb_s=read_gbs, flush=args.flush,
                           torch=torch.__version__, results=rows), f, indent=2)  # fmt: skip
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
