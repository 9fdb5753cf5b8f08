"""Diagnose the quantized MoE kernels against the reference on a GPU: error per mode, token dtype, tile rows and
layer shape, and which rows / columns disagree."""
import argparse

import torch

from autodeploy.backends.triton.kernels.moe import fused_moe
from autodeploy.ops import quant
from autodeploy.ops.moe import moe_quant_reference


def layer(mode, T, H, I, E, K, dev, seed=0):
    g = torch.Generator().manual_seed(seed)
    qz = quant.quantize_int8_weight if mode == "int8-weight" else quant.quantize_fp8_weight
    ws, ss = [], []
    for shape in ((E, I, H), (E, I, H), (E, H, I)):
        q, sc = qz(torch.randn(shape[0] * shape[1], shape[2], generator=g) * 0.3)
        ws.append(q.reshape(shape).to(dev))
        ss.append(sc.reshape(shape[:2]).to(dev))
    bs = [(torch.randn(*s, generator=g) * 0.3).to(dev) for s in ((E, I), (E, I), (E, H))]
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    x = torch.randn(T, H, generator=g).to(dev)
    return x, ids, w, ws, ss, bs


def rel(a, b):
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp(min=1e-30))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="fp8,int8-weight")
    a = p.parse_args()
    dev = torch.device("cuda")
    for mode in a.modes.split(","):
        for (T, H, I, E, K) in ((40, 96, 80, 4, 2), (40, 128, 128, 4, 2), (256, 256, 192, 8, 2), (3, 64, 64, 4, 2)):
            x, ids, w, ws, ss, bs = layer(mode, T, H, I, E, K, dev)
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                bd = [b.to(dtype) for b in bs]
                for bias in (True, False):
                    kb = bd if bias else [None] * 3
                    want = moe_quant_reference(xd, ids, w, *ws, *ss, *kb, mode=mode).float()
                    for bm in (16, 32, 64):
                        got = fused_moe(xd, ids, w, *ws, *kb, scales=ss, mode=mode, block_m=bm).float()
                        err = rel(got, want)
                        bad = ((got - want).abs() > 0.05 * want.abs().max()).nonzero()
                        rows = sorted(set(bad[:, 0].tolist()))[:8]
                        cols = sorted(set(bad[:, 1].tolist()))[:8]
                        print(f"{mode:12s} T{T} H{H} I{I} E{E} {str(dtype)[6:]:9s} bias={int(bias)} bm={bm:2d} "
                              f"rel {err:.2e} nan {int(got.isnan().sum())} bad {bad.shape[0]} rows {rows} "
                              f"cols {cols}", flush=True)


if __name__ == "__main__":
    main()
