"""Tiled int8 GEMMs for more rows than the skinny GEMMs take (decode batches, chunked prefill), each one launch
with its epilogue fused.

* **Weight-only** (``int8_weight_gemm``): ``y[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] (+ b[n])`` with W
  ``[N, K]`` int8. Each weight tile is converted to the activation dtype as it is loaded (exact: int8 values are
  exact in bf16, fp16 and fp32) and multiplied on the tensor cores with fp32 sums; the per-channel fp32 scale
  multiplies the sums, then the bias is added, in the order of ``int8_weight_linear_reference``. So the weights
  stream as one byte each. The canonical op on CUDA instead dequantizes the whole weight to the model dtype
  every call (one byte read and two written per weight), then cuBLAS reads two bytes per weight: five bytes
  against one, which is what bounds a decode step.
* **W8A8** (``int8_w8a8_gemm``): int8 rows (``quantize_int8_rows``) times int8 weights on the integer tensor
  cores, exact int32 sums, then ``(sums * x_scale[m]) * w_scale[n] (+ b[n])`` in fp32: the reference's values
  bit for bit (the product before the bias is a ``mul.rn``, which ptxas never contracts into an FMA). The
  canonical op instead writes the int32 sums to memory (cuBLASLt, or float64 sums where shapes or pointers are
  not aligned) and scales them in separate kernels.

Programs walk the output tiles in groups of ``GROUP_M`` row tiles per weight column tile, so a weight tile read by
one program is still in L2 for the next row tiles. Under ``TRITON_INTERPRET=1`` the interpreter's low-precision
``tl.dot`` is wrong, so 16-bit operands are upcast to fp32 there only (its int8 dot is exact); fp32 activations
use IEEE products (no TF32).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from autodeploy.backends.triton.kernels.common import asm_ok, interpreted, rows_2d
from autodeploy.backends.triton.kernels.rms_norm import cast_rn, emulate_rne

__all__ = ["int8_weight_gemm", "int8_w8a8_gemm", "scale_then_bias", "int8w_gemm_config", "parse_config",
           "INT8W_GEMM_MAX_M", "W8A8_GEMM_MAX_M",
           "GemmConfig"]

# Rows up to which the weight-only kernel replaces the canonical op's CUDA path (dequantize + cuBLAS). Measured on
# the H200 over Llama-8B's layer GEMMs (docs/quantization.md): the tiled GEMM is 1.5x faster at 512 rows, even at
# about 1024, slower at 2048, where the GEMM is compute-bound and cuBLAS runs nearer the tensor cores' peak.
INT8W_GEMM_MAX_M = 512
# The same for W8A8 (the canonical path: cuBLASLt int32 sums written out, then torch scaling): the tiled GEMM was
# 2.2x faster at every row count measured, up to 4096 (the largest measured).
W8A8_GEMM_MAX_M = 4096

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, swap): swap 1 computes W x^T (weight-only only)
GemmConfig = tuple[int, int, int, int, int, int]


@triton.jit
def scale_then_bias(acc, ws, b, HAS_BIAS: tl.constexpr, ASM: tl.constexpr):
    """``acc * ws (+ b)`` rounded as the references round it (``ws`` of ``acc``'s shape, ``b`` broadcastable):
    with ASM (compiled for NVIDIA) the product is a ``mul.rn``, which ptxas never contracts with the bias add
    into an FMA (one rounding instead of the reference's two)."""
    if HAS_BIAS and ASM:
        acc = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [acc, ws], dtype=tl.float32,
                                        is_pure=True, pack=1)
    else:
        acc = acc * ws
    if HAS_BIAS:
        acc += b
    return acc


@triton.jit
def _int8w_gemm_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       EVEN_K: tl.constexpr, EMULATE_RNE: tl.constexpr, W8A8: tl.constexpr, ASM: tl.constexpr,
                       SWAP: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """W8A8: ``x`` int8 rows with per-row fp32 scales at ``xs_ptr``, int32 sums; else ``x`` in the model dtype.
    ASM (compiled for NVIDIA): the product before the bias add is a ``mul.rn``. SWAP (weight-only): the product
    is computed transposed, ``W x^T``, so the converted weight tile is the MMA's first operand, which Hopper's
    wgmma reads from registers (no round trip through shared memory after the conversion), and the weight's
    outputs fill the MMA's 64-row side while the few token rows take its narrow side."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if SWAP:
        x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]  # x^T tile: [BLOCK_K, BLOCK_M]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]  # W tile: [BLOCK_N, BLOCK_K]
        sums_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_ok[None, :], other=0)
                w = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
            else:
                k_ok = (k0 + offs_k) < K
                a = tl.load(x_ptrs, mask=k_ok[:, None] & m_ok[None, :], other=0)
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
            if UPCAST:
                sums_t += tl.dot(w.to(tl.float32), a.to(tl.float32), input_precision="ieee")
            elif IEEE:
                sums_t += tl.dot(w.to(tl.float32), a, input_precision="ieee")
            else:
                sums_t += tl.dot(w.to(a.dtype), a)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        sums = tl.trans(sums_t)
    else:
        x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]  # W^T tile: [BLOCK_K, BLOCK_N]
        if W8A8:
            sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            sums = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=m_ok[:, None], other=0)
                w = tl.load(w_ptrs, mask=n_ok[None, :], other=0)
            else:
                k_ok = (k0 + offs_k) < K
                a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            if W8A8:  # exact: int8 products summed in int32
                sums += tl.dot(a, w, out_dtype=tl.int32)
            elif UPCAST:
                sums += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            elif IEEE:
                sums += tl.dot(a, w.to(tl.float32), input_precision="ieee")
            else:
                sums += tl.dot(a, w.to(a.dtype))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    acc = sums.to(tl.float32)  # (int32 -> fp32 rounds as the reference's .float() does)
    if W8A8:
        acc *= tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if PER_CHANNEL:
        ws = tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :] + tl.zeros_like(acc)
    else:
        ws = tl.load(s_ptr) + tl.zeros_like(acc)
    b = tl.load(b_ptr + offs_n, mask=n_ok & HAS_BIAS, other=0.0).to(tl.float32)[None, :]
    acc = scale_then_bias(acc, ws, b, HAS_BIAS, ASM)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :],
             cast_rn(acc, y_ptr.dtype.element_ty, EMULATE_RNE), mask=m_ok[:, None] & n_ok[None, :])


def _sms(device: torch.device) -> int:
    from autodeploy.backends.triton.partition import device_sms

    return device_sms(device)


@functools.lru_cache(maxsize=None)
def int8w_gemm_config(m: int, n: int, k: int, sms: int, w8a8: bool = False) -> GemmConfig:
    """The launch for ``m`` rows, ``n`` outputs and ``k`` inputs on ``sms`` SMs, from a sweep on the H200 over
    Llama-8B's four layer GEMMs (benchmarks/bench_int8w_gemm.py --configs; docs/quantization.md). Up to 32 rows
    the GEMM is weight-bound: narrow 32-wide output tiles with long 256-wide K tiles keep every SM streaming
    weight bytes; a wide output (more 32-wide tiles than twice the SMs, e.g. gate_up) takes 64-wide tiles. To 128
    rows 4 warps still beat 8, and at 65-128 rows the swapped product (``W x^T``) does. Beyond, or for wide
    outputs past 32 rows, 8-warp tiles narrowed until every SM has a program; W8A8 (integer MMAs on int8 tiles
    as loaded, nothing to convert) always takes those. ``AUTODEPLOY_INT8W_GEMM_CONFIG``
    ("BLOCK_M/BLOCK_N/BLOCK_K/warps/stages[/swap]") overrides it for tuning."""
    env = os.environ.get("AUTODEPLOY_INT8W_GEMM_CONFIG")
    if env:
        return parse_config(env)
    wide = triton.cdiv(n, 32) > 2 * sms
    if m <= 32 and not w8a8:
        bm, bn, bk = (16 if m <= 16 else 32, 64, 128) if wide else (16, 32, 256)
        return bm, bn, _k_tile(k, bk), 4, 4, 0
    if m <= 64 and not wide and not w8a8:
        return 32, 64, _k_tile(k, 128), 4, 4, 0
    if m <= 128 and not wide and not w8a8:
        return 64, 64, _k_tile(k, 128), 4, 3, 1
    kmax = max(16, triton.next_power_of_2(k))
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    tiles_m = triton.cdiv(m, bm)
    bn = 128 if bm <= 64 else 64
    while bn > 32 and tiles_m * triton.cdiv(n, bn) < sms:
        bn //= 2
    return bm, bn, min(64, kmax), 8, 4 if bm <= 64 else 3, 0


def _k_tile(k: int, target: int) -> int:
    """The K tile: ``target``, or the largest power of two down to 32 that divides ``k`` (a K loop without a
    masked tail: its loads stay vectorised, and the swapped form's masked loop spills 16 bytes per thread under
    Triton 3.6), else ``target`` (never more than ``k`` needs)."""
    bk = target
    while bk > 32 and k % bk:
        bk //= 2
    return min(bk if k % bk == 0 else target, max(16, triton.next_power_of_2(k)))


def parse_config(text: str) -> GemmConfig:
    """``"BLOCK_M/BLOCK_N/BLOCK_K/warps/stages[/swap]"`` -> a ``GemmConfig``."""
    values = [int(v) for v in text.split("/")]
    if len(values) not in (5, 6):
        raise ValueError(f"an int8 GEMM config is BLOCK_M/BLOCK_N/BLOCK_K/warps/stages[/swap], got {text!r}")
    return tuple(values + [0] * (6 - len(values)))  # type: ignore[return-value]


def _check_weight(x: Tensor, weight: Tensor, weight_scale: Tensor, name: str) -> Tensor:
    k, n = x.shape[-1], weight.shape[0]
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"{name} takes an int8 [N, {k}] weight with a unit last stride, got "
                         f"{weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")
    ws = weight_scale.float().reshape(-1).contiguous()
    if ws.numel() not in (1, n):
        raise ValueError(f"weight_scale must have 1 or {n} elements, got {ws.numel()}")
    return ws


def _launch(x2: Tensor, x_scale: Optional[Tensor], weight: Tensor, ws: Tensor, bias: Optional[Tensor],
            out_dtype: torch.dtype, config: Optional[GemmConfig]) -> Tensor:
    m, k = x2.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0 or n == 0:
        return y
    config = tuple(config) if config else int8w_gemm_config(m, n, k, _sms(x2.device), x_scale is not None)
    bm, bn, bk, warps, stages, swap = config + (0,) * (6 - len(config))  # a 5-value config: swap 0
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    w8a8 = x_scale is not None
    if swap and w8a8:
        raise ValueError("the swapped (W x^T) int8 GEMM is weight-only; W8A8 takes swap 0")
    interp = interpreted(_int8w_gemm_kernel)
    _int8w_gemm_kernel[grid](
        x2, x_scale if w8a8 else ws, weight, ws, bias.contiguous() if bias is not None else ws, y, m, n, k,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PER_CHANNEL=ws.numel() != 1, UPCAST=interp and x2.dtype in _16BIT,
        IEEE=x2.dtype == torch.float32, EVEN_K=k % bk == 0, EMULATE_RNE=emulate_rne(_int8w_gemm_kernel, out_dtype),
        W8A8=w8a8, ASM=asm_ok(_int8w_gemm_kernel, x2), SWAP=bool(swap),
        GROUP_M=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return y


_16BIT = (torch.float16, torch.bfloat16)


def int8_weight_gemm(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                     config: Optional[GemmConfig] = None) -> Tensor:
    """``int8_weight_linear`` for any number of rows of ``x [..., K]`` (float16/bfloat16/float32) on an int8
    ``weight [N, K]`` with a unit last stride and a per-channel (``[N]``) or per-tensor fp32 ``weight_scale``."""
    ws = _check_weight(x, weight, weight_scale, "int8_weight_gemm")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int8_weight_gemm takes float16/bfloat16/float32 activations, got {x.dtype}")
    y = _launch(rows_2d(x), None, weight, ws, bias, x.dtype, config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def int8_w8a8_gemm(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                   out_dtype: torch.dtype = torch.bfloat16, config: Optional[GemmConfig] = None) -> Tensor:
    """W8A8 int8: ``(xq [..., K] @ weight[N, K].T) * x_scale * weight_scale (+ bias)`` for any number of int8
    rows (``x_scale`` ``[..., 1]``, one per row), exact int32 sums, bit for bit ``int8_linear``'s reference once
    ``xq, x_scale`` come from ``quantize_int8_rows``."""
    ws = _check_weight(xq, weight, weight_scale, "int8_w8a8_gemm")
    if xq.dtype != torch.int8:
        raise ValueError(f"int8_w8a8_gemm takes int8 rows, got {xq.dtype}")
    x2 = rows_2d(xq)
    xs = x_scale.float().reshape(-1).expand(x2.shape[0]).contiguous()
    y = _launch(x2, xs, weight, ws, bias, out_dtype, config)
    return y.reshape(*xq.shape[:-1], weight.shape[0])
