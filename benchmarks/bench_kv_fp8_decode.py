"""Decode attention over a bf16 cache against the same cache in FP8 (E4M3 pages, per-row scales), side by side:
the split kernel's partition size (waves of programs) and tile config swept for each, on Llama-8B's heads.

Every call is a CUDA-graph replay after an L2 flush; bandwidth is the cache bytes read (values plus scales) over
the time. The FP8 output is checked against attention over the dequantized cache first.
Usage: python benchmarks/bench_kv_fp8_decode.py [--cases 64x4096,256x192] [--kinds bf16,fp8] [--page-sizes 64,32]
[--configs 64/4/5,64/8/5/128] [--blocks-configs 16/4/4/3,32/4/4/3] [--gather] [--json out.json]
(``--configs``: the tiled split kernel's BLOCK_N/warps/stages[/maxnreg]; ``--blocks-configs``: the block kernel's
BLOCK_N/BLOCKS/warps/stages, each warp owning blocks; either list may be empty.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_triton_attention import D, HKV, _decode_case, copy_bandwidth, graphed, make_flush, time_cuda  # noqa: E402

CONFIGS = "64/4/3,64/4/5,64/2/5,64/8/5,64/8/3"


def main() -> int:
    import autodeploy.backends.triton.kernels.attention as attn
    from autodeploy.backends.triton.partition import MIN_CHUNK, decode_partition, device_sms, target_work_items
    from autodeploy.ops.kv_quant import dequantize_kv, quantize_kv

    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="64x4096,256x192,16x8192")
    p.add_argument("--waves", default="1,2")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--kinds", default="bf16,fp8")
    p.add_argument("--configs", default=CONFIGS, help="BLOCK_N/warps/stages[/maxnreg],...")
    p.add_argument("--blocks-configs", default="", help="BLOCK_N/BLOCKS/warps/stages,... of the block kernel")
    p.add_argument("--page-sizes", default="64", help="cache page sizes, each a sweep of its own")
    p.add_argument("--gather", action="store_true", help="gathered key tiles of BLOCK_N (not one page per tile)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    bw = copy_bandwidth(1 << 30, 10)
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    flush = make_flush("read")
    gen = torch.Generator(device="cuda").manual_seed(0)
    default_config = attn._decode_config
    if args.gather:
        attn.DECODE_PAGE_TILES = False
    rows = []
    for spec, page_size in [(c, int(ps)) for ps in args.page_sizes.split(",") for c in args.cases.split(",")]:
        batch, ctx = map(int, spec.split("x"))
        k16, v16, page_table, seq_lens, q, cu, _ = _decode_case(batch, ctx, page_size, gen, 2.0)
        (k8, ks), (v8, vs) = quantize_kv(k16), quantize_kv(v16)
        kd, vd = dequantize_kv(k8, ks, k16.dtype), dequantize_kv(v8, vs, v16.dtype)
        caches = {"bf16": (k16, v16, None, None, 2), "fp8": (k8, v8, ks, vs, 1)}
        caches = {k: caches[k] for k in args.kinds.split(",")}
        for waves in map(float, args.waves.split(",")):
            part = decode_partition(seq_lens, cu, target=target_work_items(HKV, device_sms(q.device), waves),
                                    min_chunk=MIN_CHUNK)
            splits = int((part[1][1:] - part[1][:-1]).max())
            variants = [("tiles", tuple(map(int, c.split("/")))) for c in args.configs.split(",") if c]
            variants += [("blocks", tuple(map(int, c.split("/")))) for c in args.blocks_configs.split(",") if c]
            for kernel, cfg in variants:
                attn._decode_config = lambda *a, _c=cfg: _c
                os.environ["AUTODEPLOY_DECODE_BLOCKS_CONFIG"] = ",".join(map(str, cfg))
                for kind, (kc, vc, ksc, vsc, nbytes) in caches.items():
                    out = torch.empty_like(q)

                    def fn(kc=kc, vc=vc, ksc=ksc, vsc=vsc, out=out):
                        attn.decode_attention(q, kc, vc, seq_lens, page_table, out, scale=D**-0.5,
                                              sliding_window=None, logit_softcap=None, sinks=None,
                                              cu_seqlens_q=cu, partition=part, k_scale=ksc, v_scale=vsc)
                    try:
                        os.environ["AUTODEPLOY_DECODE_KERNEL"] = kernel
                        fn()
                        ref = torch.empty_like(q)
                        os.environ["AUTODEPLOY_DECODE_KERNEL"] = "tiles"  # the reference: the tiled kernel
                        attn.decode_attention(q, kd if ksc is not None else kc, vd if ksc is not None else vc,
                                              seq_lens, page_table, ref, scale=D**-0.5, sliding_window=None,
                                              logit_softcap=None, sinks=None, cu_seqlens_q=cu, partition=part)
                        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                        os.environ["AUTODEPLOY_DECODE_KERNEL"] = kernel
                        ms = time_cuda(graphed(fn), args.reps, 3, flush)
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  skip {kind} {kernel} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                        continue
                    nb = batch * ctx * HKV * 2 * (D * nbytes + (2 if ksc is not None else 0))
                    gbs = nb / (ms * 1e-3) / 1e9
                    rows.append(dict(batch=batch, ctx=ctx, page_size=page_size, kv=kind, waves=waves,
                                     splits=splits, kernel=kernel, config=cfg, us=ms * 1e3, GBps=gbs, rel_err=err))
                    print(f"B={batch:<4d} ctx={ctx:<6d} page={page_size:<3d} {kind:4s} waves={waves:<4g} "
                          f"splits<={splits:<3d} {kernel} cfg={cfg} {ms * 1e3:8.1f} us {gbs:6.0f} GB/s "
                          f"({100 * gbs / bw:5.1f}%) err {err:.1e}", flush=True)
                attn._decode_config = default_config
        for kind in caches:
            best = min((r for r in rows if r["batch"] == batch and r["ctx"] == ctx and r["kv"] == kind
                        and r["page_size"] == page_size), key=lambda r: r["us"])
            print(f"best B={batch} ctx={ctx} page={page_size} {kind}: waves={best['waves']:g} {best['kernel']} "
                  f"cfg={best['config']} {best['us']:.1f} us", flush=True)
        del k16, v16, k8, v8, kd, vd
        torch.cuda.empty_cache()
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
