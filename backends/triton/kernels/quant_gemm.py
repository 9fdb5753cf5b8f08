"""Skinny GEMM on quantized weights (``M`` <= 4 rows, batch-1/small-batch decode), dequantized in registers.

``y[m, n] = (sum_k a[m, k] * w[n, k]) * w_scale[n] * a_scale[m] (+ b[n])`` with W ``[N, K]`` stored int8 or
float8 E4M3 (one byte per weight: half the bf16 bytes a decode step streams). ``a`` is the activation as it is
(weight-only int8), or float8 rows with their per-token scales (W8A8 FP8), quantized by the kernel that produced
them (passes/fuse_fp8_act_quant.py) or by ``quantize_fp8_rows`` right before. (Quantizing inside this kernel,
every program re-deriving the row's absmax and quantizing its padded activation tiles, measured slower than
either.) Products of the 8-bit values are exact in fp32, so this computes the canonical ops' reference math up
to float rounding: the order of the fp32 sums, and reciprocal multiplications where the reference quantizer
divides. Each program owns ``BLOCK_N`` whole output columns and streams their weight rows once. A single row
runs on CUDA cores ("words" form: a bf16 row on int8 weights, a float8 row on float8 weights, both read as int32
words of four): one-byte weights at HBM rate are bound by the work of converting them, which this form keeps to
about one or two instructions per weight.

The ops ``autodeploy::triton_int8_weight_linear`` / ``autodeploy::triton_fp8_linear`` take the canonical
quantized ops' arguments, ``autodeploy::triton_fp8_linear_q`` already-quantized activations. Rows beyond
``QGEMV_MAX_M`` go to the canonical op, except FP8 on a GPU with FP8 tensor cores (there one launch quantizes
the activation rows, ``quantize_fp8_rows`` unless the producer did, and ``torch._scaled_mm`` multiplies) and
int8 weight-only up to ``INT8W_GEMM_MAX_M`` rows and W8A8 int8 up to ``W8A8_GEMM_MAX_M`` (the tiled GEMMs of
kernels/int8_gemm.py).
``backends/triton/passes/quant_skinny_gemm.py`` routes the graph's quantized linears here.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from autodeploy.backends.triton.kernels.pdl import launch_options, pdl_enabled, pdl_launch_dependents, pdl_wait
from autodeploy.backends.triton.kernels.common import asm_ok, interpreted, rows_2d
from autodeploy.backends.triton.kernels.device_check import kernels_agree
from autodeploy.backends.triton.kernels.fp8 import fp8_quantize_values, fp8_token_scale
from autodeploy.backends.triton.kernels.int8_gemm import (INT8W_GEMM_MAX_M, W8A8_GEMM_MAX_M, int8_w8a8_gemm,
                                                          int8_weight_gemm, scale_then_bias)
from autodeploy.ops import quant

__all__ = ["quant_gemv", "quant_gemv_config", "quantize_fp8_rows", "quantize_int8_rows", "int8_gemv",
           "int8_weight_rows_ok", "QGEMV_MAX_M", "INT8W_TC_MAX_M", "QConfig"]


QGEMV_MAX_M = 4
# int8 weight-only rows the tensor-core form also takes (its MMA's N side is 16 rows, padded): the weights still
# stream once, where the canonical op on CUDA would dequantize the whole weight before a bf16 GEMM.
INT8W_TC_MAX_M = 16


# How ``a`` reaches the products: as it is (weight-only int8), or float8 with a per-row scale at ``as_ptr``.
A_PLAIN, A_PREQUANTIZED = 0, 1


@triton.jit
def _tile(N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output columns (and which exist), the activation rows (and which exist), the K offsets."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    return offs_n, offs_n < N, offs_m, offs_m < M, tl.arange(0, BLOCK_K)


@triton.jit
def int8_to_f32(w):
    """Exact int8 -> fp32 without the I2F unit (a quarter of the FP32 rate on Hopper, below the rate at which
    one-byte weights arrive): the byte, offset to unsigned, becomes the low mantissa bits of 2^23, and one
    subtraction removes 2^23 + 128."""
    u = w.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x4B000080
    return u.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _load_qw(w_rows, k, n_ok, K, EVEN_K: tl.constexpr):
    """One ``[BLOCK_N, BLOCK_K]`` weight tile in fp32 (masked float8 lanes zeroed after the upcast: an ``other``
    fill cannot be cast to float8)."""
    if EVEN_K:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & (k < K)[None, :]
    if w_rows.dtype.element_ty == tl.int8:
        return int8_to_f32(tl.load(w_rows + k[None, :], mask=mask, other=0))
    return tl.where(mask, tl.load(w_rows + k[None, :], mask=mask).to(tl.float32), 0.0)


@triton.jit
def _load_a(a_ptr, offs_m, m_ok, k, K, stride_am, EVEN_K: tl.constexpr):
    if EVEN_K:
        mask = m_ok[:, None]
    else:
        mask = m_ok[:, None] & (k < K)[None, :]
    return tl.where(mask, tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :], mask=mask).to(tl.float32), 0.0)


@triton.jit
def _qtile(acc, w, a_ptr, offs_m, m_ok, k, K, stride_am, EVEN_K: tl.constexpr):
    """acc += a[:, k] @ w.T for one loaded weight tile."""
    a = _load_a(a_ptr, offs_m, m_ok, k, K, stride_am, EVEN_K)
    return acc + tl.sum(a[:, None, :] * w[None, :, :], 2)


@triton.jit
def _quant_gemv_kernel(
    a_ptr, w_ptr, ws_ptr, as_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    A_MODE: tl.constexpr, PER_CHANNEL: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    """PDL: the first weight tile is loaded before waiting for the kernel that produces ``a`` (weights are
    constants), as the bf16 GEMV does (kernels/pdl.py)."""
    offs_n, n_ok, offs_m, m_ok, offs_k = _tile(N, M, BLOCK_N, BLOCK_M, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w0 = _load_qw(w_rows, offs_k, n_ok, K, EVEN_K)
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _qtile(acc, w0, a_ptr, offs_m, m_ok, offs_k, K, stride_am, EVEN_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        acc = _qtile(acc, _load_qw(w_rows, k, n_ok, K, EVEN_K), a_ptr, offs_m, m_ok, k, K, stride_am, EVEN_K)
    # the reference's order: (acc * a_scale) * w_scale
    if A_MODE == 1:
        acc *= tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if PER_CHANNEL:
        acc *= tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        acc *= tl.load(ws_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _scale_bias(acc, ws_ptr, b_ptr, offs_n, n_ok, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                ASM: tl.constexpr):
    """``acc [BLOCK_N] * w_scale (+ bias)``: the epilogue of the one-row words kernels, each step rounded as the
    reference rounds it (``scale_then_bias``)."""
    if PER_CHANNEL:
        ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    else:
        ws = tl.load(ws_ptr) + tl.zeros_like(acc)
    b = tl.load(b_ptr + offs_n, mask=n_ok & HAS_BIAS, other=0.0).to(tl.float32)
    return scale_then_bias(acc, ws, b, HAS_BIAS, ASM)


@triton.jit
def _int8_words_tile(lanes, w, x_ptr, k, K4, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """lanes += products of one ``[BLOCK_N, BLOCK_K4]`` tile of int32 weight words (four int8 weights each, the
    offset to unsigned already applied) with the bf16 activations, read four to an int64 word (a bf16 is the
    top half of its fp32)."""
    if EVEN_K:
        xw = tl.load(x_ptr + k)
    else:
        xw = tl.load(x_ptr + k, mask=k < K4, other=0)
    if ASM:
        ws = tl.inline_asm_elementwise(
            asm="prmt.b32 $0, $4, 0x4B000000, 0x7440; prmt.b32 $1, $4, 0x4B000000, 0x7441; "
                "prmt.b32 $2, $4, 0x4B000000, 0x7442; prmt.b32 $3, $4, 0x4B000000, 0x7443; "
                "sub.f32 $0, $0, 0f4B000080; sub.f32 $1, $1, 0f4B000080; "
                "sub.f32 $2, $2, 0f4B000080; sub.f32 $3, $3, 0f4B000080;",
            constraints="=f,=f,=f,=f,r", args=[w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    for j in tl.static_range(4):
        if ASM:
            wj = ws[j]
        else:
            wj = (((w >> (8 * j)) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        xj = (((xw >> (16 * j)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        lanes += wj * xj[None, :]
    return lanes


@triton.jit
def _load_words(w_rows, k, n_ok, K4, EVEN_K: tl.constexpr, OFFSET: tl.constexpr):
    """A tile of int32 weight words. OFFSET: each byte offset to unsigned (XOR 0x80; masked words then load as
    0x80808080, four zeros); otherwise masked words are 0."""
    if EVEN_K:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & (k < K4)[None, :]
    w = tl.load(w_rows + k[None, :], mask=mask, other=0)
    if OFFSET:
        w = w ^ -2139062144  # 0x80808080
    return w


@triton.jit
def _words_tile(lanes, w, x_ptr, k, K4, EVEN_K: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr):
    if FP8:
        return _fp8_words_tile(lanes, w, x_ptr, k, K4, EVEN_K, ASM)
    return _int8_words_tile(lanes, w, x_ptr, k, K4, EVEN_K, ASM)


@triton.jit
def _words_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K4, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr, FP8: tl.constexpr,
):
    """One activation row against one-byte weights read as int32 words (``stride_wn`` in words), each lane
    summing its own exact products until one reduction at the end; the integer/conversion pipe is what limits
    one-byte weights at HBM rate. int8 weights (weight-only, a bf16 row): ``int8_to_f32``'s trick per byte with
    less integer work: one XOR offsets a word's four weights, and with ASM (compiled for NVIDIA) one byte permute
    per weight places it into 2^23's mantissa. FP8 (W8A8, a float8 row and its scale at ``xs_ptr``): E4M3 words
    converted exactly (``_e4m3_word_to_f32``), then ``(acc * x_scale) * w_scale`` as the reference orders it.
    PDL as in ``_quant_gemv_kernel``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K4)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w0 = _load_words(w_rows, offs_k, n_ok, K4, EVEN_K, not FP8)  # int8: offset to unsigned
    pdl_wait(PDL)
    lanes = _words_tile(tl.zeros([BLOCK_N, BLOCK_K4], dtype=tl.float32), w0, x_ptr, offs_k, K4, EVEN_K, FP8, ASM)
    for k0 in range(BLOCK_K4, K4, BLOCK_K4):
        k = k0 + offs_k
        lanes = _words_tile(lanes, _load_words(w_rows, k, n_ok, K4, EVEN_K, not FP8), x_ptr, k, K4, EVEN_K, FP8,
                            ASM)
    acc = tl.sum(lanes, 1)
    if FP8:
        acc = acc * tl.load(xs_ptr)
    acc = _scale_bias(acc, ws_ptr, b_ptr, offs_n, n_ok, PER_CHANNEL, HAS_BIAS, ASM)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _e4m3_word_to_f32(w, ASM: tl.constexpr):
    """The four E4M3 values of an int32 word (byte 0 first) as exact fp32. ASM: two ``cvt.rn.f16x2.e4m3x2``
    (E4M3 converts to fp16 exactly) and four fp16 -> fp32 conversions; otherwise the bits are rebuilt with
    integer ops (the subnormals, exponent field 0, scaled by 2^-6 / 8 as E4M3 defines them)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b16 lo, hi, h0, h1, h2, h3; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
                "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {h0, h1}, a; mov.b32 {h2, h3}, b; "
                "cvt.f32.f16 $0, h0; cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3; }",
            constraints="=f,=f,=f,=f,r", args=[w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
            is_pure=True, pack=1)
    out = ()
    for j in tl.static_range(4):
        b = (w >> (8 * j)) & 0xFF
        mag = ((b & 0x7F) << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120: the bias gap
        mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
        out = out + (tl.where((b & 0x80) != 0, -mag, mag),)
    return out


@triton.jit
def _fp8_words_tile(lanes, w, x_ptr, k, K4, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """lanes += products of one ``[BLOCK_N, BLOCK_K4]`` tile of int32 words of E4M3 weights with the float8
    activation row's words (converted once per tile, shared by the tile's rows)."""
    if EVEN_K:
        xw = tl.load(x_ptr + k)
    else:
        xw = tl.load(x_ptr + k, mask=k < K4, other=0)
    ws = _e4m3_word_to_f32(w, ASM)
    xs = _e4m3_word_to_f32(xw, ASM)
    for j in tl.static_range(4):
        lanes += ws[j] * xs[j][None, :]
    return lanes


@triton.jit
def _dp4a(acc, w, xw, ASM: tl.constexpr):
    """acc (int32) += the dot products of the four int8 values in each weight word with those of its activation
    word: one ``dp4a`` per word on CUDA (inline assembly), sign-extending shifts otherwise."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, xw, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    for j in tl.static_range(4):
        acc += ((w << (24 - 8 * j)) >> 24) * ((xw << (24 - 8 * j)) >> 24)
    return acc


@triton.jit
def _w8a8_tile(acc, w, x_row, k, K4, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    if EVEN_K:
        xw = tl.load(x_row + k)
    else:
        xw = tl.load(x_row + k, mask=k < K4, other=0)
    return _dp4a(acc, w, tl.broadcast_to(xw[None, :], w.shape), ASM)


@triton.jit
def _int8_w8a8_words_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K4, stride_xm, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    EVEN_K: tl.constexpr, PDL: tl.constexpr, ASM: tl.constexpr,
):
    """W8A8 int8 for one quantized activation row per ``program_id(1)``: int32 words of four int8 weights and
    four int8 activations, products summed exactly in int32 lanes (``_dp4a``), then ``(acc * x_scale) *
    w_scale`` as the reference orders it. Strides in words (``stride_ym`` in elements)."""
    row = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K4)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_row = xq_ptr + row * stride_xm
    w0 = _load_words(w_rows, offs_k, n_ok, K4, EVEN_K, False)
    pdl_wait(PDL)
    acc = _w8a8_tile(tl.zeros([BLOCK_N, BLOCK_K4], dtype=tl.int32), w0, x_row, offs_k, K4, EVEN_K, ASM)
    for k0 in range(BLOCK_K4, K4, BLOCK_K4):
        k = k0 + offs_k
        acc = _w8a8_tile(acc, _load_words(w_rows, k, n_ok, K4, EVEN_K, False), x_row, k, K4, EVEN_K, ASM)
    out = tl.sum(acc, 1).to(tl.float32) * tl.load(xs_ptr + row)
    out = _scale_bias(out, ws_ptr, b_ptr, offs_n, n_ok, PER_CHANNEL, HAS_BIAS, ASM)
    tl.store(y_ptr + row * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _smoothed(x_ptr, sm_ptr, row, k, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(sm_ptr + k, mask=k < K, other=1.0).to(tl.float32))
    return x


@triton.jit
def _int8_rows_kernel(x_ptr, sm_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                      HAS_SMOOTH: tl.constexpr, PDL: tl.constexpr):
    """One row per program: ``quant.quantize_int8_activation(x / smooth)`` exactly (true divisions, rounding
    half to even by adding and subtracting 1.5 * 2^23)."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        amax = tl.maximum(amax, tl.abs(_smoothed(x_ptr, sm_ptr, row, k0 + offs, K, stride_xm, HAS_SMOOTH)))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), 127.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        r = tl.math.div_rn(_smoothed(x_ptr, sm_ptr, row, k, K, stride_xm, HAS_SMOOTH), scale)
        r = tl.minimum(tl.maximum((r + 12582912.0) - 12582912.0, -127.0), 127.0)
        tl.store(q_ptr + row * stride_qm + k, r.to(tl.int8), mask=k < K)


@triton.jit
def _quant_gemv_dot_kernel(
    a_ptr, w_ptr, ws_ptr, as_ptr, b_ptr, y_ptr, M, N, K, stride_am, stride_wn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, A_MODE: tl.constexpr,
    PER_CHANNEL: tl.constexpr, PDL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """The same GEMM on the tensor cores, operands swapped (``W x^T``: the weight rows are the MMA's M side, the
    activation rows, at most 16, padded to 16 its N side), so float8 weights and activations enter the MMA as
    they are stored (W8A8 FP8); int8 weights (weight-only) are converted to the activation dtype (exact). K must
    be a multiple of BLOCK_K. UPCAST: fp32 operands (the Triton interpreter's low-precision dot is wrong); IEEE:
    fp32 activations multiply in true fp32."""
    BLOCK_M: tl.constexpr = 16
    offs_n, n_ok, offs_m, m_ok, offs_k = _tile(N, M, BLOCK_N, BLOCK_M, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    a_cols = a_ptr + offs_m[None, :] * stride_am + offs_k[:, None]  # x^T: [BLOCK_K, 16]
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_rows + k0, mask=n_ok[:, None])  # rows past N: never stored
        a = tl.load(a_cols + k0, mask=m_ok[None, :], other=0.0)
        if A_MODE == 0:  # int8 -> the activation dtype: exact (the interpreter mis-converts int8 to bf16)
            w = w.to(tl.float32) if UPCAST else w.to(a.dtype)
        if UPCAST:
            acc += tl.dot(w.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        elif IEEE:  # fp32 activations: true fp32 products, not TF32
            acc += tl.dot(w, a, input_precision="ieee")
        else:
            acc += tl.dot(w, a)
    if A_MODE == 1:
        acc *= tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[None, :]
    if PER_CHANNEL:
        acc *= tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    else:
        acc *= tl.load(ws_ptr)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


# (form, BLOCK_N, BLOCK_K, num_warps, num_stages); form: "tc" the tensor-core kernel, "cc" the CUDA-core one,
# "words" the CUDA-core one for one row read as int32 words: bf16 on int8 weights, float8 on float8 weights
# (others fall back to "cc")
QConfig = tuple[str, int, int, int, int]
FORMS = ("tc", "cc", "words")


@functools.lru_cache(maxsize=None)
def quant_gemv_config(k: int, m: int, dtype: torch.dtype = quant.FP8_DTYPE, n: int = 0) -> QConfig:
    """The launch for a ``[m, k]`` activation and ``n`` outputs, picked on an H200 over Llama-8B's shapes
    (benchmarks/bench_quant_gemv.py, docs/quantization.md). One row takes the "words" form with ``[4, 2048]``
    tiles on 4 warps, int8 and FP8 weights alike: for int8 faster at every shape than the tensor-core form
    (whose converted bf16 operands go through shared memory), for FP8 within half a microsecond of the best
    form at every shape and well ahead on the narrow ones. 2-4 rows take the tensor-core form wherever K is a
    multiple of its K tile: FP8 with wide weight tiles (warpgroup MMAs, whose FP8 accumulation is coarser than
    fp32: about 1e-3 relative, against the FP8 quantization's own 3e-2), 256 rows for the widest GEMMs; int8
    32-row tiles. Otherwise the CUDA-core form, fewer K with more rows so the ``[M, N, K]`` product stays in
    registers."""
    env = os.environ.get("AUTODEPLOY_QGEMV_CONFIG")  # tuning (benchmarks): "<form>/BLOCK_N/BLOCK_K/warps/stages"
    if env:
        kind, *nums = env.split("/")
        cfg = (kind, *map(int, nums))
        if kind != "tc" or k % cfg[2] == 0:
            return cfg  # type: ignore[return-value]
    if m <= 1:
        return "words", 4, max(32, min(2048, triton.next_power_of_2(k))), 4, 3
    if dtype == quant.FP8_DTYPE:
        if n >= 16384 and k % 256 == 0:
            return "tc", 256, 256, 8, 3
        if k % 512 == 0:
            return "tc", 64, 512, 4, 4
    elif k % 512 == 0:
        return "tc", 32, 512, 4, 4
    block_k = min(4096 // triton.next_power_of_2(max(m, 1)), triton.next_power_of_2(k))
    return "cc", 8, max(32, block_k), 8 if block_k >= 2048 else 4, 2


def _words_apply(a2: Tensor, weight: Tensor, block_k: int) -> bool:
    """Whether the "words" form takes this call: one row, bf16 on int8 weights or float8 on float8 weights,
    both viewable as 4-byte words (a bf16 row as 8-byte words of four)."""
    if weight.dtype == torch.int8:
        row_ok = a2.dtype == torch.bfloat16 and a2.data_ptr() % 8 == 0
    else:
        row_ok = a2.dtype == quant.FP8_DTYPE and a2.data_ptr() % 4 == 0
    return (a2.shape[0] == 1 and row_ok and block_k % 4 == 0 and a2.shape[1] % 4 == 0 and weight.stride(0) % 4 == 0
            and weight.data_ptr() % 4 == 0)


def quant_gemv(a: Tensor, weight: Tensor, weight_scale: Tensor, a_scale: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
               config: Optional[QConfig] = None, pdl: Optional[bool] = None) -> Tensor:
    """``(a [..., K] @ weight[N, K].T) * weight_scale * a_scale (+ bias)`` for at most QGEMV_MAX_M rows (int8
    weights: INT8W_TC_MAX_M rows in the tensor-core form, see ``int8_weight_rows_ok``).

    ``a`` is used as it is: the model dtype with int8 weights (weight-only), float8 rows with float8 weights,
    scaled by their per-row ``a_scale`` (``[..., 1]``, or one static ``[]`` scale)."""
    k, n = a.shape[-1], weight.shape[0]
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    if m > QGEMV_MAX_M and not (weight.dtype == torch.int8 and int8_weight_rows_ok(m, k, n, config)):
        raise ValueError(f"quant_gemv takes at most {QGEMV_MAX_M} rows (int8 weights: {INT8W_TC_MAX_M} in the "
                         f"tensor-core form), got {m}")
    if weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {k}] with a unit last stride, got {tuple(weight.shape)}")
    if weight.dtype not in (torch.int8, quant.FP8_DTYPE):
        raise ValueError(f"quant_gemv takes int8 or float8_e4m3fn weights, got {weight.dtype}")
    if (weight.dtype == quant.FP8_DTYPE) != (a.dtype == quant.FP8_DTYPE):
        raise ValueError(f"float8 weights take float8 activations and int8 weights 16/32-bit ones; got "
                         f"{weight.dtype} weights with {a.dtype} activations")
    a2 = a2.contiguous()
    y = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if m == 0:
        return y.reshape(*a.shape[:-1], n)
    ws = weight_scale.float().contiguous()
    per_channel = ws.numel() != 1
    if per_channel and ws.numel() != n:
        raise ValueError(f"weight_scale must have 1 or {n} elements, got {ws.numel()}")
    if a_scale is not None:
        mode, a_s = A_PREQUANTIZED, a_scale.float().reshape(-1).expand(m).contiguous()
    else:
        mode, a_s = A_PLAIN, None
    form, block_n, block_k, warps, stages = config or quant_gemv_config(k, m, weight.dtype, n)
    if form not in FORMS:
        raise ValueError(f"unknown quant_gemv form {form!r}; one of {FORMS}")
    fp8_words = form == "words" and weight.dtype == quant.FP8_DTYPE
    if fp8_words and not (_words_apply(a2, weight, block_k) and a_s is not None):  # not word-aligned
        form, block_n, block_k, warps, stages = quant_gemv_config(k, 2, weight.dtype, n)
    pdl = pdl_enabled(a.device, "gemv") if pdl is None else pdl
    if form == "words" and _words_apply(a2, weight, block_k):  # (FP8 without a scale fell back above)
        fp8 = weight.dtype == quant.FP8_DTYPE
        wv, xv = weight.view(torch.int32), a2.view(torch.int32 if fp8 else torch.int64)
        _words_kernel[(triton.cdiv(n, block_n),)](
            xv, a_s if fp8 else ws, wv, ws, bias if bias is not None else ws, y, n, k // 4, wv.stride(0),
            BLOCK_N=block_n, BLOCK_K4=block_k // 4, HAS_BIAS=bias is not None, PER_CHANNEL=per_channel,
            EVEN_K=k % block_k == 0, PDL=pdl, ASM=asm_ok(_words_kernel, a), FP8=fp8, num_warps=warps,
            num_stages=stages, **launch_options(pdl))
        return y.reshape(*a.shape[:-1], n)
    args = (a2, weight, ws, a_s if a_s is not None else ws, bias if bias is not None else ws, y, m, n, k,
            a2.stride(0), weight.stride(0), y.stride(0))
    common = dict(BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, A_MODE=mode, PER_CHANNEL=per_channel,
                  PDL=pdl, num_warps=warps, num_stages=stages, **launch_options(pdl))
    grid = (triton.cdiv(n, block_n),)
    if form == "tc":
        if k % block_k:
            raise ValueError(f"the tensor-core form needs K ({k}) to be a multiple of its K tile ({block_k})")
        _quant_gemv_dot_kernel[grid](*args, UPCAST=interpreted(_quant_gemv_dot_kernel),
                                     IEEE=a.dtype == torch.float32 and a_scale is None, **common)
    else:
        _quant_gemv_kernel[grid](*args, BLOCK_M=max(1, triton.next_power_of_2(m)), EVEN_K=k % block_k == 0,
                                 **common)
    return y.reshape(*a.shape[:-1], n)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, sin_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                     STATIC: tl.constexpr, EMULATE_RNE: tl.constexpr, PDL: tl.constexpr):
    """One row per program: absmax, scale, then the float8 values (``quant.quantize_fp8_activation``). PDL: it
    launches while the kernel before it finishes, and lets the GEMV after it start streaming its weights."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if STATIC:
        scale = tl.load(sin_ptr).to(tl.float32)
        inv = tl.math.div_rn(1.0, scale)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)))
        scale, inv = fp8_token_scale(tl.max(amax, 0))
        tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_qm + k, fp8_quantize_values(x, inv, EMULATE_RNE), mask=k < K)


def quantize_fp8_rows(x: Tensor, input_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``quant.quantize_fp8_activation`` in one launch, up to float rounding (multiplications by reciprocals
    where the reference divides): ``x [..., K]`` -> (float8 values, fp32 scale ``[..., 1]`` per token, or the
    static ``[]`` scale)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=quant.FP8_DTYPE, device=x.device)
    static = input_scale is not None
    scale = input_scale.float() if static else torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        pdl = pdl_enabled(x.device, "quant")
        _fp8_rows_kernel[(m,)](x2, q, scale, scale, k, x2.stride(0), q.stride(0), BLOCK_K=block, STATIC=static,
                               EMULATE_RNE=interpreted(_fp8_rows_kernel), PDL=pdl,
                               num_warps=4 if block >= 1024 else 1, **launch_options(pdl))
    return q.reshape(*x.shape), (scale if static else scale.reshape(*x.shape[:-1], 1))


def quantize_int8_rows(x: Tensor, smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``quant.quantize_int8_activation(x / smooth)`` in one launch, bit for bit: ``x [..., K]`` -> (int8 values,
    fp32 scale ``[..., 1]`` per token)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k))
        pdl = pdl_enabled(x.device, "quant")
        sm = smooth.contiguous() if smooth is not None else scale
        _int8_rows_kernel[(m,)](x2, sm, q, scale, k, x2.stride(0), q.stride(0), BLOCK_K=block,
                                HAS_SMOOTH=smooth is not None, PDL=pdl, num_warps=4 if block >= 1024 else 1,
                                **launch_options(pdl))
    return q.reshape(*x.shape), scale.reshape(*x.shape[:-1], 1)


def int8_gemv(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
              out_dtype: torch.dtype = torch.bfloat16, config: Optional[QConfig] = None,
              pdl: Optional[bool] = None) -> Tensor:
    """W8A8 int8: ``(xq [..., K] @ weight[N, K].T) * x_scale * weight_scale (+ bias)`` for at most QGEMV_MAX_M
    int8 rows (each streams the weights once), exact int32 sums. K must be a multiple of 4 and both int8 tensors
    4-byte aligned (``int8_words_ok``)."""
    k, n = xq.shape[-1], weight.shape[0]
    x2 = xq.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m > QGEMV_MAX_M or not int8_words_ok(x2, weight):
        raise ValueError(f"int8_gemv takes at most {QGEMV_MAX_M} int8 rows of a K divisible by 4 with a "
                         f"4-byte aligned int8 [N, K] weight; got {tuple(xq.shape)} and {tuple(weight.shape)}")
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y.reshape(*xq.shape[:-1], n)
    ws = weight_scale.float().contiguous()
    per_channel = ws.numel() != 1
    _, block_n, block_k, warps, stages = config or quant_gemv_config(k, 1, torch.int8, n)
    pdl = pdl_enabled(xq.device, "gemv") if pdl is None else pdl
    xv, wv = x2.view(torch.int32), weight.view(torch.int32)
    xs = x_scale.float().reshape(-1).expand(m).contiguous()
    _int8_w8a8_words_kernel[(triton.cdiv(n, block_n), m)](
        xv, xs, wv, ws, bias if bias is not None else ws, y, n, k // 4, xv.stride(0), wv.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_K4=block_k // 4, HAS_BIAS=bias is not None, PER_CHANNEL=per_channel,
        EVEN_K=k % block_k == 0, PDL=pdl, ASM=asm_ok(_int8_w8a8_words_kernel, xq), num_warps=warps,
        num_stages=stages, **launch_options(pdl))
    return y.reshape(*xq.shape[:-1], n)


def int8_words_ok(x2: Tensor, weight: Tensor) -> bool:
    """int8 rows and weights that can be read as int32 words."""
    return (x2.dtype == weight.dtype == torch.int8 and x2.shape[-1] % 4 == 0 and weight.shape[1] == x2.shape[-1]
            and weight.stride(1) == 1 and weight.stride(0) % 4 == 0 and weight.data_ptr() % 4 == 0
            and x2.data_ptr() % 4 == 0 and (x2.shape[0] <= 1 or x2.stride(0) % 4 == 0))


def _device_rows(x: Tensor) -> int:
    """``x``'s rows on a device that runs Triton (CPU only under the interpreter), else 0."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return x.numel() // max(1, x.shape[-1]) if on_device else 0


def _skinny(x: Tensor) -> bool:
    """Rows few enough for the skinny kernel, on a device that runs Triton."""
    return 0 < _device_rows(x) <= QGEMV_MAX_M


def int8_weight_rows_ok(m: int, k: int, n: int, config: Optional[QConfig] = None) -> bool:
    """Whether ``quant_gemv`` takes ``m`` rows on int8 weights: up to QGEMV_MAX_M in any form, up to
    INT8W_TC_MAX_M where the launch is the tensor-core form (K a multiple of its K tile)."""
    if m <= QGEMV_MAX_M:
        return True
    form, _, block_k, _, _ = config or quant_gemv_config(k, m, torch.int8, n)
    return m <= INT8W_TC_MAX_M and form == "tc" and k % block_k == 0


@torch.library.custom_op("autodeploy::triton_int8_weight_linear", mutates_args=())
def triton_int8_weight_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``autodeploy::int8_weight_linear`` with its decode rows (up to INT8W_TC_MAX_M where K allows the
    tensor-core form) on the skinny quantized GEMM, and up to INT8W_GEMM_MAX_M rows on the tiled weight-only
    GEMM (kernels/int8_gemm.py), both reading each int8 weight once."""
    rows = _device_rows(x)
    if rows > 0 and weight.stride(-1) == 1:
        if int8_weight_rows_ok(rows, x.shape[-1], weight.shape[0]):
            return quant_gemv(x, weight, weight_scale, None, bias)
        # 16-bit rows: fp32 ones would multiply with FMAs, not tensor cores (true fp32 products), and spill
        if rows <= INT8W_GEMM_MAX_M and x.dtype in (torch.bfloat16, torch.float16) and _int8w_gemm_agrees(x.device):
            return int8_weight_gemm(x, weight, weight_scale, bias)
    return torch.ops.autodeploy.int8_weight_linear(x, weight, weight_scale, bias)


_INT8_CHECKED: dict[str, bool] = {}
_INT8W_GEMM_CHECKED: dict[str, bool] = {}
_INT8_GEMM_CHECKED: dict[str, bool] = {}


def _int8_kernels_agree(device: torch.device) -> bool:
    """The W8A8 int8 kernels against the reference, exactly: every int8 value, smoothing, a bias, a ragged K."""
    def check() -> bool:
        g = torch.Generator().manual_seed(0)
        k = 2 * quant_gemv_config(4096, 1, torch.int8)[2] + 68
        x = (torch.randn(2, k, generator=g) * torch.logspace(-3, 3, k)).to(device=device, dtype=torch.bfloat16)
        w = (torch.randint(0, 256, (40, k), generator=g) - 128).to(torch.int8).to(device)
        ws, smooth, b = (torch.rand(40, generator=g).to(device) + 0.5, torch.rand(k, generator=g).to(device) + 0.5,
                         torch.randn(40, generator=g).to(device))
        xq, xs = quantize_int8_rows(x, smooth)
        # compared in fp32: a bf16 output would round away a difference in the last bits of the sums
        return torch.equal(int8_gemv(xq, xs, w, ws, b, out_dtype=torch.float32),
                           quant.int8_linear_reference(x.float(), w, ws, smooth, b))

    return kernels_agree(_INT8_CHECKED, device, "W8A8 int8", "int8_linear", check)


def _tiled_check_inputs(device: torch.device, g: torch.Generator) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The tiled int8 GEMMs' check inputs: every int8 weight value, ragged N, both K branches (a K tail, and K a
    multiple of every K tile), scales and a bias; yields ``(w, ws, b, x)`` for two row counts per K (each of the
    weight-only launch configurations up to 128 rows, the swapped product included, on both K branches), ``x``
    fp32 of unit scale for the caller to spread and cast."""
    n = 136
    ws, b = torch.rand(n, generator=g).to(device) + 0.5, torch.randn(n, generator=g).to(device)
    for k in (3 * 64 + 36, 4 * 64):
        w = (torch.randint(0, 256, (n, k), generator=g) - 128).to(torch.int8).to(device)
        for m in ((70, 20) if k % 64 else (40, 100)):
            yield w, ws, b, torch.randn(m, k, generator=g).to(device)


def _int8_gemm_agrees(device: torch.device) -> bool:
    """The tiled W8A8 int8 GEMM against the reference, exactly (fp32 outputs, so no output rounding hides a
    difference), with smoothing, on ``_tiled_check_inputs``."""
    def check() -> bool:
        g = torch.Generator().manual_seed(0)
        for w, ws, b, x in _tiled_check_inputs(device, g):
            x = (x * torch.logspace(-3, 3, x.shape[-1], device=device)).to(torch.bfloat16)
            smooth = torch.rand(x.shape[-1], generator=g).to(device) + 0.5
            xq, xs = quantize_int8_rows(x, smooth)
            if not torch.equal(int8_w8a8_gemm(xq, xs, w, ws, b, out_dtype=torch.float32),
                               quant.int8_linear_reference(x.float(), w, ws, smooth, b)):
                return False
        return True

    return kernels_agree(_INT8_GEMM_CHECKED, device, "W8A8 int8 tiled GEMM", "int8_linear", check)


def _int8w_gemm_agrees(device: torch.device) -> bool:
    """The tiled weight-only GEMM against the reference on ``_tiled_check_inputs``, in bf16 and fp16: the products
    are exact in fp32, so only the order of the fp32 sums differs, and then the output's one rounding."""
    def check() -> bool:
        g = torch.Generator().manual_seed(0)
        for i, (w, ws, b, x) in enumerate(_tiled_check_inputs(device, g)):
            # (a range fp16 sums cannot overflow)
            x = (x * torch.logspace(-2, 1, x.shape[-1], device=device)).to(torch.float16 if i % 2 else torch.bfloat16)
            got = int8_weight_gemm(x, w, ws, b).float()
            want = quant.int8_weight_linear_reference(x, w, ws, b).float()
            # within 1e-5 of the sum of |products| (the sums' order), plus one rounding of the output
            bound = (x.float().abs() @ w.float().abs().t()) * ws
            if not bool(((got - want).abs() <= 1e-5 * bound + 2 ** -7 * want.abs()).all()):
                return False
        return True

    return kernels_agree(_INT8W_GEMM_CHECKED, device, "int8 weight-only GEMM", "int8_weight_linear", check)


@torch.library.custom_op("autodeploy::triton_int8_linear", mutates_args=())
def triton_int8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, smooth: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None) -> Tensor:
    """``autodeploy::int8_linear`` (W8A8, SmoothQuant) with its rows quantized in one launch, then multiplied by
    the int8 words GEMV (decode rows) or, up to W8A8_GEMM_MAX_M rows, the tiled int8 GEMM with its scaling
    epilogue fused; both give the reference's values bit for bit."""
    if (_skinny(x) and x.shape[-1] % 4 == 0 and weight.stride(-1) == 1 and weight.stride(0) % 4 == 0
            and weight.data_ptr() % 4 == 0 and _int8_kernels_agree(x.device)):
        xq, xs = quantize_int8_rows(x, smooth)
        return int8_gemv(xq, xs, weight, weight_scale, bias, out_dtype=x.dtype)
    rows = _device_rows(x)
    if (QGEMV_MAX_M < rows <= W8A8_GEMM_MAX_M and weight.stride(-1) == 1
            and _int8_gemm_agrees(x.device)):
        xq, xs = quantize_int8_rows(x, smooth)
        return int8_w8a8_gemm(xq, xs, weight, weight_scale, bias, out_dtype=x.dtype)
    return torch.ops.autodeploy.int8_linear(x, weight, weight_scale, smooth, bias)


@torch.library.custom_op("autodeploy::triton_fp8_linear", mutates_args=())
def triton_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None) -> Tensor:
    """``autodeploy::fp8_linear`` with its decode rows on the skinny quantized GEMM (activations quantized to
    float8 per token first, exactly as the canonical op does)."""
    if _skinny(x) and weight.stride(-1) == 1:  # one quantizing launch, then the GEMV on float8 rows
        xq, xs = quantize_fp8_rows(x, input_scale)
        return quant_gemv(xq, weight, weight_scale, xs, bias, out_dtype=x.dtype)
    if x.is_cuda and quant._scaled_mm_accepts(x, weight, weight_scale, input_scale, bias):
        return quant.scaled_mm_fp8(x, weight, weight_scale, input_scale, bias, quantize=quantize_fp8_rows)
    return torch.ops.autodeploy.fp8_linear(x, weight, weight_scale, input_scale, bias)


@torch.library.custom_op("autodeploy::triton_fp8_linear_q", mutates_args=())
def triton_fp8_linear_q(xq: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor,
                        bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``autodeploy::fp8_linear`` on an activation its producer kernel already quantized (float8 ``xq`` with
    per-token scales ``x_scale [..., 1]``, passes/fuse_fp8_act_quant.py): the skinny GEMM for decode rows,
    ``torch._scaled_mm`` for more, the reference otherwise."""
    if _skinny(xq) and weight.stride(-1) == 1:
        return quant_gemv(xq, weight, weight_scale, x_scale, bias, out_dtype=out_dtype)
    if xq.is_cuda and quant.scaled_mm_accepts_prequantized(xq, weight):
        return quant.scaled_mm_prequantized(xq, x_scale, weight, weight_scale, bias, out_dtype)
    return quant.fp8_prequantized_reference(xq, x_scale, weight, weight_scale, bias, out_dtype)


@triton_fp8_linear_q.register_fake
def _fake_q(xq, x_scale, weight, weight_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], weight.shape[0]), dtype=out_dtype)


def _fake(x, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


triton_int8_weight_linear.register_fake(_fake)
triton_int8_linear.register_fake(_fake)
triton_fp8_linear.register_fake(_fake)

# canonical op -> its skinny-GEMM replacement (same arguments, by name)
SKINNY_OPS = {
    torch.ops.autodeploy.int8_weight_linear.default: torch.ops.autodeploy.triton_int8_weight_linear.default,
    torch.ops.autodeploy.int8_linear.default: torch.ops.autodeploy.triton_int8_linear.default,
    torch.ops.autodeploy.fp8_linear.default: torch.ops.autodeploy.triton_fp8_linear.default,
}
