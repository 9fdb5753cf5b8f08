"""Skinny GEMM (``M`` <= 4 rows) for decode at small batch: ``y = x @ W.T (+ b)``, W ``[N, K]`` row-major.

At batch 1 a decode step is a chain of weight reads; the GEMM kernels' fixed costs (ramp-up, tail, split-K
reduction kernels) are what separates a step from its bandwidth floor. This kernel streams W once in
``[BLOCK_N, BLOCK_K]`` tiles (16-byte loads along K), keeps the few activation rows in registers, and needs no
second reduction kernel: each program owns BLOCK_N whole output columns. On Hopper it launches with programmatic
dependent launch and loads its first weight tile before waiting for the kernel that produces x (kernels/pdl.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from autodeploy.backends.triton.kernels.gated_act import ACTIVATIONS, gated
from autodeploy.backends.triton.kernels.pdl import launch_options, pdl_enabled, pdl_launch_dependents, pdl_wait
from autodeploy.backends.triton.kernels.rms_norm import emulate_rne

__all__ = ["gemv", "GEMV_MAX_M", "GEMV_MIN_N", "gemv_config"]

GEMV_MAX_M = 4
# Linears with at least this many output features run their single-row calls here. Every linear does since the
# one-row config streams 8 x 2048 tiles with 8 warps (gemv_config): measured on H100 (bench_gemv.py) that beat
# cuBLAS on the narrow Llama-1B shapes too (qkv / o / down x16: 97-105 / 81-89 / 223 us vs 113 / 104 / 247 us),
# and a 1B batch-1 step went from 1.28 to 1.23 ms (8B unchanged at 5.96 ms, its linears were all here already).
GEMV_MIN_N = 0
# How the kernel uses programmatic dependent launch (see _gemv_kernel).
PDL_MODE = 3


@triton.jit
def _load_w(w_rows, k, n_ok, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
    return tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv_tile(acc, w, x_ptr, k, offs_m, m_ok, K, stride_xm, EVEN_K: tl.constexpr):
    """acc += x[:, k] @ w.T for one loaded ``[BLOCK_N, BLOCK_K]`` weight tile."""
    if EVEN_K:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
    else:
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                    other=0.0)
    # [BLOCK_M, 1, BLOCK_K] * [1, BLOCK_N, BLOCK_K] summed over K
    return acc + tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, gate_row, up_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """PDL (launched with programmatic dependent launch, see kernels/pdl.py): 1 loads the first weight tile
    before waiting for the kernel that produces x, so the weight stream of this GEMM starts while the previous
    kernel drains, then lets the next kernel launch; 2 waits first (no prefetch); 3 prefetches but leaves the
    next kernel's launch to the implicit trigger at exit.

    GATED (1 + an ``ACTIVATIONS`` code): W stacks gate and up rows (from rows ``gate_row`` / ``up_row``, N
    outputs each). A program's tile interleaves BLOCK_N/2 gate rows with the matching up rows and its epilogue
    writes ``act(gate) * up``, so the fused gate/up GEMM needs no activation kernel after it."""
    pid = tl.program_id(0)
    if GATED:
        j = tl.arange(0, BLOCK_N)
        out_n = pid * (BLOCK_N // 2) + j // 2
        offs_n = out_n + tl.where(j % 2 == 0, gate_row, up_row)
        n_ok = out_n < N
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PDL == 1 or PDL == 3:
        w0 = _load_w(w_rows, offs_k, n_ok, K, EVEN_K)
        pdl_wait(True)
        if PDL == 1:
            pdl_launch_dependents(True)
        acc = _gemv_tile(acc, w0, x_ptr, offs_k, offs_m, m_ok, K, stride_xm, EVEN_K)
        k_start = BLOCK_K
    else:
        if PDL == 2:
            pdl_wait(True)
            pdl_launch_dependents(True)
        k_start = 0
    for k0 in range(k_start, K, BLOCK_K):
        k = k0 + offs_k
        acc = _gemv_tile(acc, _load_w(w_rows, k, n_ok, K, EVEN_K), x_ptr, k, offs_m, m_ok, K, stride_xm, EVEN_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        # round like the unfused GEMM's output, then the gated-act kernel's exact math
        gate, up = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty).to(tl.float32), (BLOCK_M, BLOCK_N // 2, 2)))
        cols = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + cols[None, :],
                 gated(gate, up, GATED - 1, y_ptr.dtype.element_ty, EMULATE_RNE),
                 mask=m_ok[:, None] & (cols < N)[None, :])
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv_config(k: int, m: int = 1) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). Measured on H100 (benchmarks/bench_gemv.py, decode steps of
    bench_decode.py): one row streams 8 x 2048 tiles with 8 warps (1B step 1.23 ms vs 1.29 with 8 x 1024 on 4
    warps once the narrow linears run here too; 8B the same 5.96 ms either way); with more rows the K tile shrinks
    so the [M, N, K] product stays in registers."""
    if m <= 1:
        block_k = min(2048, triton.next_power_of_2(k))
        return 8, max(16, block_k), 8 if block_k >= 2048 else 4, 2
    block_k = min(1024 // triton.next_power_of_2(m), triton.next_power_of_2(k))
    return 8, max(16, block_k), 4, 2


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[tuple[int, int, int, int]] = None, pdl: Optional[bool] = None,
         pdl_mode: Optional[int] = None, gated: Optional[str] = None, gate_first: bool = True) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` for at most GEMV_MAX_M rows of x (in x's dtype).

    ``gated`` (an activation of ``gated_act.ACTIVATIONS``): weight stacks gate and up halves (gate first unless
    ``gate_first`` is False) and the result is ``act(x @ gate.T) * (x @ up.T)``, ``[..., N / 2]``."""
    k = x.shape[-1]
    n = weight.shape[0]
    gate_row = up_row = 0
    if gated is not None:
        if gated not in ACTIVATIONS or n % 2:
            raise ValueError(f"gated GEMV needs an even number of rows and an activation in {sorted(ACTIVATIONS)}")
        n //= 2
        gate_row, up_row = (0, n) if gate_first else (n, 0)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv takes at most {GEMV_MAX_M} rows, got {m}")
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with a unit last stride, got {tuple(weight.shape)}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    block_n, block_k, warps, stages = config or gemv_config(k, m)
    pdl = pdl_enabled(x.device, "gemv") if pdl is None else pdl
    per_program = block_n // 2 if gated is not None else block_n
    _gemv_kernel[(triton.cdiv(n, per_program),)](
        x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        gate_row, up_row,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0, PDL=(pdl_mode or PDL_MODE) if pdl else 0,
        GATED=0 if gated is None else 1 + ACTIVATIONS[gated], EMULATE_RNE=emulate_rne(_gemv_kernel, x.dtype),
        num_warps=warps, num_stages=stages, **launch_options(pdl),
    )
    return y.reshape(*x.shape[:-1], n)
