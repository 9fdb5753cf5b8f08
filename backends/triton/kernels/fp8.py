"""Float8 E4M3 helpers shared by the kernels that quantize: exact rounding under the interpreter, and the
per-token activation scale of ``quant.quantize_fp8_activation``."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_e4m3", "fp8_token_scale", "fp8_quantize_values"]


@triton.jit
def round_e4m3(x):
    """fp32 ``|x| <= 448`` rounded to the nearest E4M3 value (ties to even), still in fp32. Done with integer
    ops, so the conversion that follows is exact: the Triton interpreter's own fp32 -> fp8 cast mis-rounds
    values that carry into the next binade and E4M3 subnormals."""
    b = x.to(tl.int32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & -1048576  # keep 3 mantissa bits, ties to even
    normal = b.to(tl.float32, bitcast=True)
    t = tl.abs(x) * 512.0  # subnormals (|x| < 2^-6): multiples of 2^-9
    fl = t.to(tl.int32)
    fr = t - fl.to(tl.float32)
    m = fl + ((fr > 0.5) | ((fr == 0.5) & ((fl & 1) == 1))).to(tl.int32)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(x < 0, -sub, sub)
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def fp8_token_scale(amax):
    """(per-token scale, its reciprocal) of ``quant.quantize_fp8_activation`` from a row's fp32 absmax: the scale
    is ``max(amax, 1e-12) / 448``; values are quantized as ``clamp(x * (1 / scale))`` (reciprocals where the
    reference divides: equal up to float rounding)."""
    scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def fp8_quantize_values(x, inv, EMULATE_RNE: tl.constexpr):
    """fp32 ``x * inv`` clamped to E4M3's range and converted (ties to even; emulated under the interpreter)."""
    q = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
    if EMULATE_RNE:
        q = round_e4m3(q)
    return q.to(tl.float8e4nv)
