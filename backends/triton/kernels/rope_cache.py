"""Fused rotary embedding + paged KV-cache write (Triton).

Why fused: in the cached graph every layer does ``q, k = rope(q, k); cache[slot] = k, v``. Doing the
rotation and the scatter into the paged cache in one launch reads q/k/v once and writes each result
once, instead of materialising rotated k and then copying it into the cache.

Conventions (see docs/contracts.md):
  * q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` in the flattened token layout. They may be strided views
    (e.g. slices of a fused qkv projection) as long as the last dim has unit stride.
  * cos/sin ``[T, R]`` (HF NeoX / ``rotate_half`` layout, R <= D, R even). Dims ``>= R`` pass through.
  * caches ``[num_pages, page_size, Hkv, D]``; token ``t`` goes to flat slot ``slot_mapping[t]``
    (= page * page_size + row), a negative slot means "padding, do not write".
  * FP8 caches (``k_scale``/``v_scale`` ``[num_pages, page_size, Hkv]`` given): each (token, head) row is
    quantized as autodeploy/ops/kv_quant.py says (power-of-two scale, E4M3 round-to-nearest-even), bit-identical
    to the torch reference (:func:`fp8_quantize_rows`).

Numerics: the rotation is computed in fp32 and rounded once to the q/k dtype. HF computes
``q * cos + rotate_half(q) * sin`` in the q dtype (three roundings), so in bf16/fp16 results agree
with HF within a couple of ulps of the storage dtype (and exactly, up to fma contraction, with a
reference that computes in fp32 and rounds once).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .fp8 import round_e4m3  # noqa: F401 - used by the cache-write kernels

from .rms_norm import cast_rn, emulate_rne

__all__ = ["rope_and_cache_write", "rope", "cache_write", "fp8_quantize_rows"]

# Elements of one [BLOCK_H, BLOCK_D] tile; several tiles (q, its rotate partner, k, v) are live at
# once, so keep it moderate to avoid register spills on large head dims.
_TILE_ELEMS = 2048


@triton.jit
def rope_coeffs(cos_ptr, sin_ptr, offs_d, ROT: tl.constexpr):
    """(partner, rot_mask, cos, sin) of one token's cos/sin rows for :func:`rotate`.

    rotate_half: dim d < R/2 pairs with d + R/2 (negated), R/2 <= d < R with d - R/2. ``sin`` comes back
    carrying that sign; outside the rotary dims cos == 1 and sin == 0, so those dims pass through unchanged.
    """
    rot_mask = offs_d < ROT
    first = offs_d < ROT // 2
    partner = tl.where(first, offs_d + ROT // 2, offs_d - ROT // 2)
    cos = tl.load(cos_ptr + offs_d, mask=rot_mask, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + offs_d, mask=rot_mask, other=0.0).to(tl.float32)
    return partner, rot_mask, cos, tl.where(first, -sin, sin)


@triton.jit
def rotate(row_ptr, offs, partner, mask, rot_mask, cos, sin):
    """``x*cos + rotate_half(x)*sin`` in fp32 for a block of rows at ``row_ptr`` (offsets ``offs``; the
    coefficients broadcast against them), with the coefficients of :func:`rope_coeffs`."""
    x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row_ptr + partner, mask=mask & rot_mask, other=0.0).to(tl.float32)
    return x * cos + xp * sin


@triton.jit
def pow2_at_least(x):
    """(``s``, ``1 / s``): ``s = 2^ceil(log2(x))`` for fp32 ``x >= 0``, from the bits (at least fp32's smallest
    normal); both are powers of two, so scaling by them is exact."""
    bits = tl.maximum(x.to(tl.int32, bitcast=True), 0x00800000)
    s_bits = (bits + 0x7FFFFF) & 0x7F800000
    return s_bits.to(tl.float32, bitcast=True), ((254 << 23) - s_bits).to(tl.float32, bitcast=True)


@triton.jit
def fp8_quantize_rows(x, AXIS: tl.constexpr):
    """(E4M3-exact fp32 values, fp32 power-of-two scales) of the rows of ``x`` along ``AXIS`` (kv_quant.py):
    ``s = 2^ceil(log2(amax / 448))``, ``x / s`` exact."""
    s, inv = pow2_at_least(tl.max(tl.abs(x.to(tl.float32)), AXIS) * (1.0 / 448.0))
    if AXIS == 1:
        xq = round_e4m3(x.to(tl.float32) * inv[:, None])
    else:
        xq = round_e4m3(x.to(tl.float32) * inv)
    return xq, s


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cos_t, stride_sin_t, stride_qot, stride_qoh,
    stride_kc_page, stride_kc_row, stride_kc_h,
    stride_vc_page, stride_vc_row, stride_vc_h,
    stride_s_page, stride_s_row,
    HQ, HKV, page_size,
    D: tl.constexpr, ROT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    DO_Q: tl.constexpr, DO_KV: tl.constexpr, ROTATE_K: tl.constexpr, NEED_ROT: tl.constexpr,
    EMULATE_RNE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One program = one token x one block of heads (q heads and kv heads share the block index).
    KV_FP8: rows are quantized, their scales stored at ``[page, row, head]`` of the scale caches (unit head
    stride)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D

    if NEED_ROT:  # == DO_Q or ROTATE_K (computed on the host)
        partner, rot_mask, cos, sin = rope_coeffs(cos_ptr + t * stride_cos_t, sin_ptr + t * stride_sin_t, offs_d,
                                                  ROT)

    if DO_Q:
        q_mask = (offs_h < HQ)[:, None] & d_mask[None, :]
        q = rotate(q_ptr + t * stride_qt + offs_h[:, None] * stride_qh, offs_d[None, :], partner[None, :], q_mask,
                   rot_mask[None, :], cos[None, :], sin[None, :])
        q_out = q_out_ptr + t * stride_qot + offs_h[:, None] * stride_qoh + offs_d[None, :]
        tl.store(q_out, cast_rn(q, q_out_ptr.dtype.element_ty, EMULATE_RNE), mask=q_mask)

    if DO_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        # Clamp so padding tokens never form out-of-range addresses (their stores are masked).
        safe = tl.maximum(slot, 0)
        page = safe // page_size
        row = safe % page_size
        # Padding tokens (slot < 0) get an empty head range. (Folding the scalar condition into
        # the head bound also sidesteps an interpreter bug with `block_mask & scalar_bool`.)
        h_lim = tl.where(slot >= 0, HKV, 0)
        kv_mask = (offs_h < h_lim)[:, None] & d_mask[None, :]
        k_base = k_ptr + t * stride_kt
        if ROTATE_K:
            k = rotate(k_base + offs_h[:, None] * stride_kh, offs_d[None, :], partner[None, :], kv_mask,
                       rot_mask[None, :], cos[None, :], sin[None, :])
            # Round to k's dtype first: same as rope-then-copy into a cache of another dtype.
            k = cast_rn(k, k_ptr.dtype.element_ty, EMULATE_RNE)
        else:
            k = tl.load(k_base + offs_h[:, None] * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        kc = (k_cache_ptr + page * stride_kc_page + row * stride_kc_row
              + offs_h[:, None] * stride_kc_h + offs_d[None, :])
        vc = (v_cache_ptr + page * stride_vc_page + row * stride_vc_row
              + offs_h[:, None] * stride_vc_h + offs_d[None, :])
        if KV_FP8:
            # Padding heads/dims load as 0 and do not raise the row's amax.
            kq, ks = fp8_quantize_rows(k, 1)
            vq, vs = fp8_quantize_rows(v, 1)
            tl.store(kc, kq.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(vc, vq.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
            s_off = page * stride_s_page + row * stride_s_row + offs_h
            h_ok = offs_h < h_lim
            tl.store(k_scale_ptr + s_off, ks.to(k_scale_ptr.dtype.element_ty), mask=h_ok)
            tl.store(v_scale_ptr + s_off, vs.to(v_scale_ptr.dtype.element_ty), mask=h_ok)
        else:
            # Plain casts: a same-dtype cache gets a bit-exact copy, a wider one an exact widening.
            tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

def _unit_last(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim densely; copy only if it is not already unit-stride."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _prep_cos_sin(cos: torch.Tensor, sin: torch.Tensor, T: int, D: int):
    """Accept ``[T, R]`` or any leading shape with T rows in total (e.g. HF's ``[1, T, R]``)."""
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    R = cos.shape[-1]
    if R % 2 or R > D or R == 0:
        raise ValueError(f"rotary dim {R} must be even, > 0 and <= head dim {D}")
    cos = _unit_last(cos.reshape(-1, R))
    sin = _unit_last(sin.reshape(-1, R))
    if cos.shape[0] != T:
        raise ValueError(f"cos/sin have {cos.shape[0]} rows, expected one per token ({T})")
    return cos, sin, R


def _check_cache(cache: torch.Tensor, hkv: int, d: int, name: str) -> None:
    if cache.dim() != 4 or cache.shape[2] != hkv or cache.shape[3] != d:
        raise ValueError(f"{name} must be [num_pages, page_size, {hkv}, {d}], "
                         f"got {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride on the last dim (it is written in place)")


def _blocks(D: int, H: int):
    block_d = triton.next_power_of_2(D)
    block_h = max(1, min(triton.next_power_of_2(max(H, 1)), _TILE_ELEMS // block_d))
    return block_h, block_d


def _launch(q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, *, D, R, rotate_k, k_scale=None,
            v_scale=None):
    """Launch the kernel; ``q``/``q_out`` None = no q rotation, ``k`` None = no cache write; ``k_scale``/``v_scale``
    given = FP8 caches."""
    do_q, do_kv = q is not None, k is not None
    T = (q if do_q else k).shape[0]
    HQ = q.shape[1] if do_q else 0
    HKV = k.shape[1] if do_kv else 0
    block_h, block_d = _blocks(D, max(HQ, HKV))
    grid = (T, triton.cdiv(max(HQ, HKV), block_h))

    # Unused operands are replaced by any real tensor; the disabled branches never touch them.
    dummy = q if do_q else k

    def arg(x):
        return dummy if x is None else x

    def st(x, *dims):
        return [0 if x is None else x.stride(d) for d in dims]

    _rope_cache_kernel[grid](
        arg(q), arg(k), arg(v), arg(cos), arg(sin), arg(q_out),
        arg(k_cache), arg(v_cache), arg(slot_mapping), arg(k_scale), arg(v_scale),
        *st(q, 0, 1), *st(k, 0, 1), *st(v, 0, 1), *st(cos, 0), *st(sin, 0), *st(q_out, 0, 1),
        *st(k_cache, 0, 1, 2), *st(v_cache, 0, 1, 2), *st(k_scale, 0, 1),
        HQ, HKV, k_cache.shape[1] if do_kv else 1,
        D=D, ROT=R, BLOCK_H=block_h, BLOCK_D=block_d,
        DO_Q=do_q, DO_KV=do_kv, ROTATE_K=rotate_k, NEED_ROT=do_q or rotate_k,
        EMULATE_RNE=emulate_rne(_rope_cache_kernel,
                                *(x.dtype for x in (q, k) if x is not None)),
        KV_FP8=k_scale is not None,
        num_warps=4 if block_h * block_d >= 1024 else 2,
    )


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale, v_scale) -> None:
    """An FP8 cache: float8 E4M3 pages and both ``[num_pages, page_size, Hkv]`` scale tensors, unit head stride
    and equal strides (the kernels take one set)."""
    if k_scale is None and v_scale is None:
        return
    if k_scale is None or v_scale is None:
        raise ValueError("an FP8 KV cache needs both k_scale and v_scale")
    if k_cache.dtype != torch.float8_e4m3fn or v_cache.dtype != torch.float8_e4m3fn:
        raise TypeError(f"an FP8 KV cache stores float8_e4m3fn pages, got {k_cache.dtype}, {v_cache.dtype}")
    want = tuple(k_cache.shape[:3])
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if tuple(sc.shape) != want or sc.stride(-1) != 1 or sc.stride() != k_scale.stride():
            raise ValueError(f"{name} must be {list(want)} with a unit head stride, got {tuple(sc.shape)}")


def _check_kv(k, v, k_cache, v_cache, slot_mapping, T):
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k/v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != T or slot_mapping.numel() != T:
        raise ValueError(f"expected {T} tokens in k/v/slot_mapping, got {k.shape[0]}, "
                         f"{slot_mapping.numel()}")
    _check_cache(k_cache, k.shape[1], k.shape[2], "k_cache")
    _check_cache(v_cache, k.shape[1], k.shape[2], "v_cache")
    return slot_mapping.reshape(-1).contiguous()


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                         v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate q and k, write rotated k and raw v into the paged caches; return rotated q.

    q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, cos/sin ``[T, R]``, caches ``[P, page_size, Hkv, D]``
    (updated in place), slot_mapping ``[T]`` (negative = skip). Returns a new contiguous
    ``[T, Hq, D]`` tensor in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    T, _, D = q.shape
    if k.dim() != 3 or k.shape[-1] != D:
        raise ValueError(f"k must be [T, Hkv, {D}], got {tuple(k.shape)}")
    slot_mapping = _check_kv(k, v, k_cache, v_cache, slot_mapping, T)
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if T == 0:
        return q_out
    cos, sin, R = _prep_cos_sin(cos, sin, T, D)
    _launch(q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping, D=D, R=R, rotate_k=True, k_scale=k_scale,
            v_scale=v_scale)
    return q_out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one ``[T, H, D]`` tensor (no cache write); returns a new tensor."""
    if x.dim() != 3:
        raise ValueError(f"x must be [T, H, D], got {tuple(x.shape)}")
    T, _, D = x.shape
    x = _unit_last(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    cos, sin, R = _prep_cos_sin(cos, sin, T, D)
    _launch(x, None, None, cos, sin, out, None, None, None, D=D, R=R, rotate_k=False)
    return out


def cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor] = None,
                v_scale: Optional[torch.Tensor] = None) -> None:
    """Scatter k/v ``[T, Hkv, D]`` into the paged caches at ``slot_mapping`` (in place, no rope); with scales,
    quantized to FP8."""
    T = k.shape[0] if k.dim() == 3 else -1
    slot_mapping = _check_kv(k, v, k_cache, v_cache, slot_mapping, T)
    check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    if T == 0:
        return
    k, v = _unit_last(k), _unit_last(v)
    _launch(None, k, v, None, None, None, k_cache, v_cache, slot_mapping, D=k.shape[2], R=0,
            rotate_k=False, k_scale=k_scale, v_scale=v_scale)
