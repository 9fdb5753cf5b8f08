"""Skinny GEMM on quantized weights (``M`` <= 4 rows, batch-1/small-batch decode), dequantized in registers.

``y[m, n] = (sum_k a[m, k] * w[n, k]) * w_scale[n] * a_scale[m] (+ b[n])`` with W ``[N, K]`` stored int8 or
float8 E4M3 (one byte per weight: half the bf16 bytes a decode step streams). ``a`` is the activation as it is
(weight-only int8) or already quantized to float8 per token (W8A8 FP8, ``a_scale`` its per-row scale). Products
of the 8-bit values are exact in fp32, so this computes the canonical ops' reference math up to the order of
the fp32 sums. Each program owns ``BLOCK_N`` whole output columns and streams their weight rows once.

The ops ``autodeploy::triton_int8_weight_linear`` / ``autodeploy::triton_fp8_linear`` take the canonical
quantized ops' arguments; rows beyond ``QGEMV_MAX_M`` go to the canonical op (its reference or device fast
paths). ``backends/triton/passes/quant_skinny_gemm.py`` routes the graph's quantized linears here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from autodeploy.ops import quant

__all__ = ["quant_gemv", "QGEMV_MAX_M"]

QGEMV_MAX_M = 4


@triton.jit
def _quant_gemv_kernel(
    a_ptr, w_ptr, ws_ptr, as_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_A_SCALE: tl.constexpr, PER_CHANNEL: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # masked lanes are zeroed after the fp32 upcast: an ``other`` fill cannot be cast to float8
        k = k0 + offs_k
        if EVEN_K:
            w_mask = n_ok[:, None]
            a_mask = m_ok[:, None]
        else:
            k_ok = k < K
            w_mask = n_ok[:, None] & k_ok[None, :]
            a_mask = m_ok[:, None] & k_ok[None, :]
        w = tl.where(w_mask, tl.load(w_rows + k[None, :], mask=w_mask).to(tl.float32), 0.0)
        a = tl.where(a_mask, tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=a_mask).to(tl.float32), 0.0)
        acc += tl.sum(a[:, None, :] * w[None, :, :], 2)
    if PER_CHANNEL:
        acc *= tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        acc *= tl.load(ws_ptr)
    if HAS_A_SCALE:
        acc *= tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(k: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): 1-byte weights, so twice the K of the bf16 GEMV tile for the same bytes."""
    block_k = min(4096 // triton.next_power_of_2(max(m, 1)), triton.next_power_of_2(k))
    return 8, max(32, block_k), 8 if block_k >= 2048 else 4


def quant_gemv(a: Tensor, weight: Tensor, weight_scale: Tensor, a_scale: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(a [..., K] @ weight[N, K].T) * weight_scale * a_scale (+ bias)`` for at most QGEMV_MAX_M rows."""
    k, n = a.shape[-1], weight.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    if m > QGEMV_MAX_M:
        raise ValueError(f"quant_gemv takes at most {QGEMV_MAX_M} rows, got {m}")
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with a unit last stride, got {tuple(weight.shape)}")
    if weight.dtype not in (torch.int8, quant.FP8_DTYPE):
        raise ValueError(f"quant_gemv takes int8 or float8_e4m3fn weights, got {weight.dtype}")
    a2 = a2.contiguous()
    y = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if m == 0:
        return y.reshape(*a.shape[:-1], n)
    ws = weight_scale.float().contiguous()
    per_channel = ws.numel() != 1
    if per_channel and ws.numel() != n:
        raise ValueError(f"weight_scale must have 1 or {n} elements, got {ws.numel()}")
    a_s = a_scale.float().reshape(-1).expand(m).contiguous() if a_scale is not None else None
    block_n, block_k, warps = _config(k, m)
    _quant_gemv_kernel[(triton.cdiv(n, block_n),)](
        a2, weight, ws, a_s if a_s is not None else ws, bias if bias is not None else ws, y, m, n, k,
        a2.stride(0), weight.stride(0), y.stride(0),
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None,
        HAS_A_SCALE=a_s is not None, PER_CHANNEL=per_channel, EVEN_K=k % block_k == 0, num_warps=warps,
    )
    return y.reshape(*a.shape[:-1], n)


def _skinny(x: Tensor) -> bool:
    """Rows few enough for the skinny kernel, on a device that runs Triton (CPU only under the interpreter)."""
    rows = x.numel() // max(1, x.shape[-1])
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and 0 < rows <= QGEMV_MAX_M


@torch.library.custom_op("autodeploy::triton_int8_weight_linear", mutates_args=())
def triton_int8_weight_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``autodeploy::int8_weight_linear`` with its decode rows on the skinny quantized GEMM."""
    if _skinny(x) and weight.stride(-1) == 1:
        return quant_gemv(x, weight, weight_scale, None, bias)
    return torch.ops.autodeploy.int8_weight_linear(x, weight, weight_scale, bias)


@torch.library.custom_op("autodeploy::triton_fp8_linear", mutates_args=())
def triton_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None) -> Tensor:
    """``autodeploy::fp8_linear`` with its decode rows on the skinny quantized GEMM (activations quantized to
    float8 per token first, exactly as the canonical op does)."""
    if _skinny(x) and weight.stride(-1) == 1:
        xq, xs = quant.quantize_fp8_activation(x, input_scale)
        return quant_gemv(xq, weight, weight_scale, xs, bias, out_dtype=x.dtype)
    return torch.ops.autodeploy.fp8_linear(x, weight, weight_scale, input_scale, bias)


def _fake(x, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


triton_int8_weight_linear.register_fake(_fake)
triton_fp8_linear.register_fake(_fake)

# canonical op -> its skinny-GEMM replacement (same arguments, by name)
SKINNY_OPS = {
    torch.ops.autodeploy.int8_weight_linear.default: torch.ops.autodeploy.triton_int8_weight_linear.default,
    torch.ops.autodeploy.fp8_linear.default: torch.ops.autodeploy.triton_fp8_linear.default,
}
