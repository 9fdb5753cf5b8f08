"""Triton attention kernels over the paged KV cache (see docs/contracts.md).

Two entry points over the paged cache ``[num_pages, page_size, Hkv, D]``:

* :func:`context_attention` -- prefill / extend sequences (flattened ``[Tq, Hq, D]`` queries, possibly with
  cached context), reading K/V only from the cache (the new tokens are written before it runs). Flash-attention
  with an online softmax. The ``GROUP = Hq // Hkv`` query heads that share a KV head are folded into the M
  dimension of the tile, so every KV tile is loaded once per KV group.
* :func:`decode_attention` -- one query token per sequence: ONE split-K launch does RoPE on q and the new
  key, the new token's cache write and flash-decoding over the partition table of :mod:`..partition` (one key
  range of one sequence per program, sized so long and short sequences get splits in proportion; a KV tile is
  one whole page); a small second kernel merges the splits (or the last split program of a sequence does, by
  atomic ticket: ``merge_in_kernel``). Where many short contexts decode (``short_context_launch``), the op
  writes the new tokens with the RoPE + cache-write kernel first (``new_token_mode``), and splits merge by
  ticket. Over a complete cache, an alternative split kernel (``_decode_blocks_kernel``, opt-in:
  ``blocks_kernel``) gives each warp its own blocks of keys and merges the warps' softmaxes once, at the end.

Semantics (contract): query at absolute position ``i`` sees key ``j`` iff ``j <= i`` and, with a window ``w``,
``i - j < w``. Scores ``(q.k) * scale``, optional softcap ``c * tanh(s / c)``, optional per-head sink logit that
only enlarges the softmax denominator. Softmax/accumulation in fp32, output in q's dtype; rows with no visible
key produce zeros.

The softmax runs in base 2 (``exp2``): scores are pre-multiplied by ``log2(e)``; every logit that enters the
max/denominator (scores, sinks, split LSEs) lives in that domain.

KV tiles are gathered per key through the page table (``page_table[s, j // PAGE_SIZE]``), so the KV tile size
``BLOCK_N`` is independent of the page size (any page size works; rows of one key are ``D`` contiguous
elements, which keeps the loads coalesced).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from autodeploy.backends.triton.kernels.pdl import launch_options, pdl_enabled, pdl_launch_dependents, pdl_wait

from autodeploy.backends.triton.kernels.rms_norm import cast_rn, emulate_rne
from autodeploy.backends.triton.kernels.rope_cache import (
    check_kv_scales, fp8_quantize_rows, pow2_at_least, rope_coeffs, rotate)
from autodeploy.backends.triton.partition import derive_partition, device_sms, target_work_items

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation.

    UPCAST: the Triton interpreter computes bf16 ``tl.dot`` wrongly, so under the interpreter operands are
    upcast to fp32. IEEE: fp32 inputs use true fp32 products (not TF32) so fp32 models match the reference.
    """
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _fp16_rows(q):
    """(``q / s`` in fp16, ``s``): ``s`` the power of two that puts ``max |q|`` at or below 2^14, so the scaled
    values are exact in fp16 down to 2^-28 of the largest."""
    s, inv = pow2_at_least(tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0) * (1.0 / 16384.0))
    return (q.to(tl.float32) * inv).to(tl.float16), s


@triton.jit
def _pv(acc, alpha, p, v, v_s, UPCAST: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr):
    """``acc * alpha + p @ v``; KV_FP8: ``v_s`` is each key's V scale (a power of two, 0 for masked keys). ``p``
    takes the scales relative to the tile's largest, which multiplies the product instead (exact), so the
    weights keep their range in a 16-bit dot whatever the V magnitudes."""
    if KV_FP8:
        v_max = tl.maximum(tl.max(v_s, 0), 1.1754943508222875e-38)
        p = p * (v_s * (1.0 / v_max))[None, :]  # powers of two: exact
        return acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE) * v_max
    return acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)


@triton.jit
def _tanh(x):
    """tanh via exp; saturates to +-1 correctly and needs no libdevice (portable across Triton versions)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load2d(ptrs, mask_a, mask_b, USE_A: tl.constexpr, USE_B: tl.constexpr):
    """Load with only the masks that are needed (unmasked loads vectorise better)."""
    if USE_A and USE_B:
        x = tl.load(ptrs, mask=mask_a & mask_b, other=0.0)
    elif USE_A:
        x = tl.load(ptrs, mask=mask_a, other=0.0)
    elif USE_B:
        x = tl.load(ptrs, mask=mask_b, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attn_tiles(
    acc,
    m_i,
    l_i,
    q,
    pos,
    kv_lo,
    kv_hi,
    k_base,
    v_base,
    pt_row,
    stride_kp,
    stride_kr,
    stride_vp,
    stride_vr,
    qk_scale,
    softcap_scale,
    softcap_log2,
    window,
    alibi,
    apos,
    ks_base,
    vs_base,
    stride_sp,
    stride_sr,
    PAGE_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEED_DMASK: tl.constexpr,
    MASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with the keys ``[kv_lo, kv_hi)`` in tiles of BLOCK_N.

    ``q``: ``[M, BLOCK_D]`` rows (query tokens x heads of one KV group), ``pos``: ``[M]`` absolute positions.
    MASK=False is the fast path for tiles the caller proved fully visible to every row (no per-score mask,
    no key-range mask on loads). HAS_ALIBI: ``alibi`` ``[M]`` is each row's slope (base 2), ``apos`` ``[M]`` its
    query position; the score gains ``alibi * (j - apos)``. KV_FP8: K/V rows are E4M3 with one scale per
    (key, head) at ``ks_base``/``vs_base + page * stride_sp + row * stride_sr``; the K scale multiplies the
    key's scores, the V scale its probabilities (exact: the scales are powers of two).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    for start in range(kv_lo, kv_hi, BLOCK_N):
        j = start + offs_n
        j_ok = j < kv_hi
        # Gather: key j lives in page page_table[s, j // PAGE_SIZE], row j % PAGE_SIZE.
        page = tl.load(pt_row + j // PAGE_SIZE, mask=j_ok, other=0).to(tl.int64)
        row = (j % PAGE_SIZE).to(tl.int64)
        k_ptrs = k_base + (page * stride_kp + row * stride_kr)[None, :] + offs_d[:, None]
        kt = _load2d(k_ptrs, j_ok[None, :], d_ok[:, None], MASK, NEED_DMASK)  # [BLOCK_D, BLOCK_N]
        if KV_FP8:
            kt = kt.to(q.dtype)
        qk = _dot(q, kt, UPCAST, IEEE)  # [M, BLOCK_N] fp32
        if KV_FP8:
            s_off = page * stride_sp + row * stride_sr
            qk = qk * tl.load(ks_base + s_off, mask=j_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            qk = softcap_log2 * _tanh(qk * softcap_scale)
        else:
            qk = qk * qk_scale
        if HAS_ALIBI:
            qk = qk + alibi[:, None] * (j[None, :] - apos[:, None]).to(tl.float32)
        if MASK:
            vis = (j[None, :] <= pos[:, None]) & j_ok[None, :]
            if HAS_WINDOW:
                vis = vis & ((pos[:, None] - j[None, :]) < window)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + (page * stride_vp + row * stride_vr)[:, None] + offs_d[None, :]
        v = _load2d(v_ptrs, j_ok[:, None], d_ok[None, :], MASK, NEED_DMASK)  # [BLOCK_N, BLOCK_D]
        if KV_FP8:
            v = v.to(q.dtype)
            v_s = tl.load(vs_base + s_off, mask=j_ok, other=0.0).to(tl.float32)
        acc = _pv(acc, alpha, p, v, v_s if KV_FP8 else alpha, UPCAST, IEEE, KV_FP8)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _page_scales(ks_base, vs_base, page, stride_sp, stride_sr, PAGE_SIZE: tl.constexpr):
    """An FP8 page's per-key K and V scales (fp32), as in :func:`_attn_tiles`."""
    s_off = page.to(tl.int64) * stride_sp + tl.arange(0, PAGE_SIZE) * stride_sr
    return tl.load(ks_base + s_off).to(tl.float32), tl.load(vs_base + s_off).to(tl.float32)


@triton.jit
def _page_step(
    acc, m_i, l_2d, q, pg, k_lo, k_hi, k_base, v_base, pt_row, k_off, v_off, stride_kp, stride_vp,
    qk_scale, softcap_scale, softcap_log2, alibi, apos, k_s, v_s,
    PAGE_SIZE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NEED_DMASK: tl.constexpr,
    MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Online-softmax update with one whole page as the KV tile (BLOCK_N == PAGE_SIZE): one scalar page-table
    load, then K and V rows at loop-invariant offsets from the page base (both loads issued before any math).
    MASK: only keys in ``[k_lo, k_hi)`` of the page count (the range's first/last page). ``l_2d`` ``[M, PAGE]``
    holds the softmax denominator unreduced (its row sums are the denominator), which keeps a cross-warp
    reduction out of every page. KV_FP8: ``k_s``/``v_s`` are the page's key scales (loaded by the caller,
    ahead of time: their loads are too narrow for the asynchronous-copy pipeline)."""
    page = tl.load(pt_row + pg).to(tl.int64)
    j = pg * PAGE_SIZE + tl.arange(0, PAGE_SIZE)
    j_ok = (j >= k_lo) & (j < k_hi)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_D
    kt = _load2d(k_base + page * stride_kp + k_off, j_ok[None, :], d_ok[:, None], MASK, NEED_DMASK)
    v = _load2d(v_base + page * stride_vp + v_off, j_ok[:, None], d_ok[None, :], MASK, NEED_DMASK)
    if KV_FP8:
        if MASK:  # rows outside [k_lo, k_hi) hold other sequences' (or no) scales: keep them out of _pv's max
            v_s = tl.where(j_ok, v_s, 0.0)
        kt = kt.to(q.dtype)
        v = v.to(q.dtype)
    qk = _dot(q, kt, UPCAST, IEEE)
    if KV_FP8:
        qk = qk * k_s[None, :]
    if HAS_SOFTCAP:
        qk = softcap_log2 * _tanh(qk * softcap_scale)
    else:
        qk = qk * qk_scale
    if HAS_ALIBI:
        qk = qk + alibi[:, None] * (j[None, :] - apos[:, None]).to(tl.float32)
    if MASK:
        qk = tl.where(j_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_2d = l_2d * alpha[:, None] + p
    acc = _pv(acc, alpha, p, v, v_s if KV_FP8 else alpha, UPCAST, IEEE, KV_FP8)
    return acc, m_new, l_2d


@triton.jit
def _attn_pages(
    acc, m_i, l_i, q, lo, hi, k_base, v_base, pt_row, stride_kp, stride_kr, stride_vp, stride_vr,
    qk_scale, softcap_scale, softcap_log2, alibi, apos, ks_base, vs_base, stride_sp, stride_sr,
    PAGE_SIZE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, NEED_DMASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Keys ``[lo, hi)`` page by page: partial first/last pages masked, whole pages on the unmasked path.

    KV_FP8: the whole pages' scales are loaded one page ahead (the page-table entry two ahead), so their
    latency overlaps the previous page's math instead of stalling each page."""
    offs_n = tl.arange(0, PAGE_SIZE)
    offs_d = tl.arange(0, BLOCK_D)
    k_off = offs_n[None, :] * stride_kr + offs_d[:, None]  # [D, PAGE]: K^T rows of one page
    v_off = offs_n[:, None] * stride_vr + offs_d[None, :]  # [PAGE, D]
    l_2d = tl.where(offs_n[None, :] == 0, l_i[:, None], 0.0)  # the incoming sum, in column 0
    k_s = tl.zeros([PAGE_SIZE], dtype=tl.float32)  # placeholders without KV_FP8
    v_s = k_s
    first_full = (lo + PAGE_SIZE - 1) // PAGE_SIZE
    last_full = hi // PAGE_SIZE  # whole pages: [first_full, last_full); first_full > last_full: inside one page
    for part in tl.static_range(2):  # the masked head page (the whole range when it lies inside one page), tail page
        if part == 0:
            pg_m = lo // PAGE_SIZE
            run = (lo < hi) & (lo % PAGE_SIZE != 0)
        else:
            pg_m = last_full
            run = (first_full <= last_full) & (hi % PAGE_SIZE != 0)
        if run:
            if KV_FP8:
                k_s, v_s = _page_scales(ks_base, vs_base, tl.load(pt_row + pg_m), stride_sp, stride_sr, PAGE_SIZE)
            acc, m_i, l_2d = _page_step(
                acc, m_i, l_2d, q, pg_m, lo, hi, k_base, v_base, pt_row, k_off, v_off, stride_kp,
                stride_vp, qk_scale, softcap_scale, softcap_log2, alibi, apos, k_s, v_s,
                PAGE_SIZE, HEAD_D, BLOCK_D, NEED_DMASK, True, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8)  # fmt: skip
        if part == 0:  # the whole pages, between the two
            last = tl.maximum(last_full - 1, first_full)  # prefetch indices are clamped into the range
            page_next = first_full * 0
            if KV_FP8 and first_full < last_full:
                k_s, v_s = _page_scales(ks_base, vs_base, tl.load(pt_row + first_full), stride_sp, stride_sr,
                                        PAGE_SIZE)
                page_next = tl.load(pt_row + tl.minimum(first_full + 1, last))
            for pg in range(first_full, last_full):
                if KV_FP8:
                    page_after = tl.load(pt_row + tl.minimum(pg + 2, last))
                    k_s_next, v_s_next = _page_scales(ks_base, vs_base, page_next, stride_sp, stride_sr, PAGE_SIZE)
                acc, m_i, l_2d = _page_step(
                    acc, m_i, l_2d, q, pg, lo, hi, k_base, v_base, pt_row, k_off, v_off, stride_kp,
                    stride_vp, qk_scale, softcap_scale, softcap_log2, alibi, apos, k_s, v_s,
                    PAGE_SIZE, HEAD_D, BLOCK_D, NEED_DMASK, False, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8)  # fmt: skip
                if KV_FP8:
                    k_s, v_s, page_next = k_s_next, v_s_next, page_after
    return acc, m_i, tl.sum(l_2d, 1)


@triton.jit
def _finalize(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS: tl.constexpr):
    """Normalise the accumulator, folding the sink logit into the denominator. Empty rows give zeros."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha + tl.exp2(sink - m_f)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    return acc / l_i[:, None]


# ----------------------------------------------------------------------------------------------------------
# Context (prefill / extend) kernel
# ----------------------------------------------------------------------------------------------------------


# The page-table width (stride_pt) and the sequence count of uncaptured steps change from step to step; Triton
# would compile a new variant whenever a value flips between ==1, divisible by 16 and neither (seconds each,
# mid-serving).
@triton.jit(do_not_specialize=["stride_pt", "num_seqs"])
def _context_attn_kernel(
    q_ptr,
    k_cache,
    v_cache,
    out_ptr,
    cu_seqlens_q,
    seq_lens_kv,
    page_table,
    sinks_ptr,
    alibi_ptr,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kp,
    stride_kr,
    stride_kh,
    stride_vp,
    stride_vr,
    stride_vh,
    stride_pt,
    stride_sp,
    stride_sr,
    qk_scale,
    softcap_scale,
    softcap_log2,
    window,
    num_seqs,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NEED_DMASK: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    FLAT_GRID: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Grid ``(cdiv(max_q_len * GROUP, BLOCK_M), num_seqs, Hkv)``, or with FLAT_GRID
    ``(cdiv(T * GROUP, BLOCK_M) + num_seqs, Hkv)``: sized by the token and sequence counts only, so one launch
    serves any split of T tokens into sequences (a CUDA graph replays it for other steps).

    The rows of a sequence's KV group are ``r = token * GROUP + head_in_group``; a program owns BLOCK_M
    consecutive rows of one sequence (no padding for non power-of-two groups). FLAT_GRID: sequence ``s``'s tiles
    are programs ``first_tile(s) = (cu_seqlens_q[s] * GROUP) // BLOCK_M + s`` onwards, at least as many as its
    rows need, the last sequence's within the grid; a program finds its sequence by binary search over
    ``first_tile``. (The flat grid measured 7-10% slower on long prefills on an H100, so host-composed steps keep
    the 3-D grid.) Programs past their sequence's rows exit. SKIP_SINGLE: one-token sequences are decodes,
    attended by the decode kernel (device-composed steps).

    The key range is split in three phases: window-edge tiles (masked), fully visible tiles (unmasked fast
    path), diagonal tiles (masked); tiles fully outside the causal/window range are never visited.
    """
    if FLAT_GRID:
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        # the last sequence whose first tile is <= pid (first_tile is strictly increasing): SEARCH_STEPS halvings
        lo = pid * 0
        hi = lo + num_seqs
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            go = (tl.load(cu_seqlens_q + mid).to(tl.int32) * GROUP) // BLOCK_M + mid <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        seq = lo
        q_start = tl.load(cu_seqlens_q + seq).to(tl.int32)
        pid_m = pid - ((q_start * GROUP) // BLOCK_M + seq)
    else:
        pid_m = tl.program_id(0)
        seq = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(cu_seqlens_q + seq).to(tl.int32)
    q_len = tl.load(cu_seqlens_q + seq + 1).to(tl.int32) - q_start
    if SKIP_SINGLE and q_len <= 1:
        return
    n_rows = q_len * GROUP
    row0 = pid_m * BLOCK_M
    if row0 >= n_rows:
        return
    kv_len = tl.load(seq_lens_kv + seq).to(tl.int32)
    ctx = kv_len - q_len  # absolute position of this sequence's first new token

    offs_m = row0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    tok = offs_m // GROUP
    head = kvh * GROUP + offs_m % GROUP
    pos = ctx + tok
    min_pos = ctx + row0 // GROUP
    max_pos = ctx + (tl.minimum(row0 + BLOCK_M, n_rows) - 1) // GROUP

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    tok64 = (q_start + tok).to(tl.int64)
    q_ptrs = q_ptr + tok64[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    alibi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked tiles give exp2(-inf) = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_base = k_cache + kvh.to(tl.int64) * stride_kh
    v_base = v_cache + kvh.to(tl.int64) * stride_vh
    ks_base = k_scale + kvh.to(tl.int64)  # scales: [page, row, head] with a unit head stride
    vs_base = v_scale + kvh.to(tl.int64)
    pt_row = page_table + seq.to(tl.int64) * stride_pt

    kv_hi = max_pos + 1
    # Tiles [.., diag) are at or below every row's causal limit.
    diag = ((min_pos + 1) // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        kv_lo = (tl.maximum(min_pos - window + 1, 0) // BLOCK_N) * BLOCK_N
        # Tiles starting at >= max_pos - window + 1 are inside every row's window.
        win_safe = tl.cdiv(tl.maximum(max_pos - window + 1, 0), BLOCK_N) * BLOCK_N
        mid_lo = tl.minimum(tl.maximum(kv_lo, win_safe), diag)
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q, pos, kv_lo, mid_lo, k_base, v_base, pt_row,
            stride_kp, stride_kr, stride_vp, stride_vr, qk_scale, softcap_scale, softcap_log2, window, alibi, pos, ks_base, vs_base, stride_sp, stride_sr,
            PAGE_SIZE, HEAD_D, BLOCK_D, BLOCK_N, NEED_DMASK, True, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, UPCAST,
            IEEE, KV_FP8,
        )  # fmt: skip
    else:
        mid_lo = 0
    acc, m_i, l_i = _attn_tiles(
        acc, m_i, l_i, q, pos, mid_lo, diag, k_base, v_base, pt_row,
        stride_kp, stride_kr, stride_vp, stride_vr, qk_scale, softcap_scale, softcap_log2, window, alibi, pos, ks_base, vs_base, stride_sp, stride_sr,
        PAGE_SIZE, HEAD_D, BLOCK_D, BLOCK_N, NEED_DMASK, False, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8,
    )  # fmt: skip
    acc, m_i, l_i = _attn_tiles(
        acc, m_i, l_i, q, pos, diag, kv_hi, k_base, v_base, pt_row,
        stride_kp, stride_kr, stride_vp, stride_vr, qk_scale, softcap_scale, softcap_log2, window, alibi, pos, ks_base, vs_base, stride_sp, stride_sr,
        PAGE_SIZE, HEAD_D, BLOCK_D, BLOCK_N, NEED_DMASK, True, HAS_WINDOW, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8,
    )  # fmt: skip

    o = _finalize(acc, m_i, l_i, sinks_ptr, head, row_ok, HAS_SINKS)
    o_ptrs = out_ptr + tok64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Decode kernel: RoPE + new-token cache write + split-K attention + in-kernel merge, one launch per layer
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _merge_last(mid_o, mid_lse, tickets, split_start, sinks_ptr, out_ptr, seq, kvh, tok, n_items, head, h_ok,
                offs_d, d_ok, stride_mow, stride_moh, stride_mlw, stride_ot, stride_oh, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr):
    """The last of a sequence's split items (by ticket) merges their partials for one KV head's query heads.

    The barrier orders every thread's partial stores before the ticket (a release at GPU scope); the acquire
    side reads the partials through L2 (``.cg``), since another SM's stores never reach this SM's L1."""
    tl.debug_barrier()
    ticket = tickets + seq.to(tl.int64) * tl.num_programs(1) + kvh
    if tl.atomic_add(ticket, 1, sem="acq_rel", scope="gpu") == n_items - 1:
        tl.store(ticket, 0)  # every item of this launch has taken its ticket: ready for the next launch
        first = tl.load(split_start + seq).to(tl.int64)
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        if HAS_SINKS:
            m = tl.load(sinks_ptr + head, mask=h_ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        den = tl.where(m == float("-inf"), 0.0, 1.0)  # the sink's own weight, exp2(sink - m) at m = sink
        o = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for i in range(n_items):
            row = first + i
            lse = tl.load(mid_lse + row * stride_mlw + head, mask=h_ok, other=float("-inf"), cache_modifier=".cg")
            part = tl.load(mid_o + row * stride_mow + head[:, None] * stride_moh + offs_d[None, :],
                           mask=h_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, lse)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: every weight stays 0
            a = tl.exp2(m - m_ref)
            b = tl.exp2(lse - m_ref)
            o = o * a[:, None] + part * b[:, None]
            den = den * a + b
            m = m_new
        den = tl.where(den == 0.0, 1.0, den)
        o_ptrs = out_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, (o / den[:, None]).to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _group_heads(kvh, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_D: tl.constexpr):
    """(query heads, their mask, head-dim offsets, their mask) of KV head ``kvh``'s group: the M rows of a
    decode tile."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    return kvh * GROUP + offs_h, offs_h < GROUP, offs_d, offs_d < HEAD_D


@triton.jit
def _work_item(work_ptr, split_start, w):
    """Work item ``w`` of the partition table: (sequence, first key, end key, the sequence's item count); a
    negative sequence is an idle item (its other values are meaningless)."""
    seq = tl.load(work_ptr + 3 * w)
    first = tl.maximum(seq, 0)
    n_items = tl.load(split_start + first + 1) - tl.load(split_start + first)
    return seq, tl.load(work_ptr + 3 * w + 1), tl.load(work_ptr + 3 * w + 2), n_items


@triton.jit(do_not_specialize=["stride_pt"])
def _decode_kernel(
    q_ptr, k_new, v_new, cos_ptr, sin_ptr, slot_ptr,
    k_cache, v_cache, out_ptr,
    cu_seqlens_q, seq_lens_kv, page_table, work_ptr, split_start, sinks_ptr, alibi_ptr, mid_o, mid_lse,
    tickets, k_scale, v_scale,
    stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh, stride_cos, stride_sin,
    stride_ot, stride_oh,
    stride_kp, stride_kr, stride_kh, stride_vp, stride_vr, stride_vh,
    stride_pt, stride_mow, stride_moh, stride_mlw, stride_sp, stride_sr,
    qk_scale, softcap_scale, softcap_log2,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NEED_DMASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    NEW_KV: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr, PAGE_TILES: tl.constexpr,
    EMULATE_RNE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    KV_FP8: tl.constexpr, F16_DOT: tl.constexpr, MERGE: tl.constexpr,
):
    """Grid ``(work items, Hkv)``. Item ``w`` reduces keys ``[lo, hi)`` of sequence ``seq`` (the partition
    table, window already applied); all GROUP q heads of the KV head are the M rows of one tile.

    ROPE: q (and the new k) are rotated here from the raw projections and ``cos/sin`` rows.
    NEW_KV: the step's new token is not in the cache yet. The item that owns the last key writes the new K/V
    into the cache and attends to it from registers, so no program ever reads a cache row written in this
    launch, and RoPE, cache write and attention are one launch.
    PAGE_TILES: a KV tile is one whole page (BLOCK_N == PAGE_SIZE); else keys are gathered one by one.
    KV_FP8: the cache is E4M3 with per-(key, head) scales; the new token is quantized on write and attended
    as the cache holds it (dequantized). F16_DOT (fp8 cache, 16-bit model): the cached keys and values enter the
    dots as fp16 (E4M3 converts to
    fp16 exactly, in one instruction per two values; to bf16 it takes several), with q scaled by a power of two
    into fp16's range first (exact for every bf16 value within 28 octaves of the largest) and the scale folded
    back into the scores.
    A sequence with one item writes its output directly; otherwise the item stores its normalised partial and
    base-2 LSE for :func:`_decode_reduce_kernel`, or (MERGE) takes a ticket from ``tickets[seq, kvh]`` and the
    last of the sequence's items merges the partials itself (and resets the ticket), so no reduction launch
    follows.
    """
    pdl_wait(PDL)  # before anything else: q, the new K/V and the cache all come from earlier kernels
    pdl_launch_dependents(PDL)
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, s_lo, s_hi, n_items = _work_item(work_ptr, split_start, w)
    if seq < 0:
        return

    head, h_ok, offs_d, d_ok = _group_heads(kvh, GROUP, BLOCK_H, BLOCK_D, HEAD_D)
    tok = tl.load(cu_seqlens_q + seq).to(tl.int64)  # the decode query's row in q/out
    owns_new = False
    if NEW_KV:
        owns_new = s_hi == tl.load(seq_lens_kv + seq)
    k_base = k_cache + kvh.to(tl.int64) * stride_kh
    v_base = v_cache + kvh.to(tl.int64) * stride_vh
    ks_base = k_scale + kvh.to(tl.int64)  # scales: [page, row, head] with a unit head stride
    vs_base = v_scale + kvh.to(tl.int64)
    q_rows = q_ptr + tok * stride_qt + head[:, None] * stride_qh
    qmask = h_ok[:, None] & d_ok[None, :]
    if ROPE:
        partner, rot_mask, cos, sin = rope_coeffs(cos_ptr + tok * stride_cos, sin_ptr + tok * stride_sin, offs_d,
                                                  ROT)
        q = rotate(q_rows, offs_d[None, :], partner[None, :], qmask, rot_mask[None, :], cos[None, :], sin[None, :])
        q = cast_rn(q, q_ptr.dtype.element_ty, EMULATE_RNE)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
    if NEW_KV:
        # The owner's new K/V, slot and cache write come before the cache loop: their loads go out with q's
        # (same latency, waited for once) instead of trailing the loop as a second dependent chain. Other items
        # load nothing (the bound masks every lane).
        new_ok = offs_d < tl.where(owns_new, HEAD_D, 0)
        kn_row = k_new + tok * stride_knt + kvh.to(tl.int64) * stride_knh
        if ROPE:
            k1 = rotate(kn_row, offs_d, partner, new_ok, rot_mask, cos, sin)
            k1 = cast_rn(k1, k_new.dtype.element_ty, EMULATE_RNE)
        else:
            k1 = tl.load(kn_row + offs_d, mask=new_ok, other=0.0)
        v1 = tl.load(v_new + tok * stride_vnt + kvh.to(tl.int64) * stride_vnh + offs_d, mask=new_ok, other=0.0)
        slot = tl.load(slot_ptr + tok, mask=owns_new, other=-1).to(tl.int64)
        page = tl.maximum(slot, 0) // PAGE_SIZE
        row = tl.maximum(slot, 0) % PAGE_SIZE
        # A negative slot means padding: do not write. (The scalar condition goes into the bound, not into
        # `mask & scalar`, which the interpreter rejects.)
        w_ok = offs_d < tl.where(slot >= 0, HEAD_D, 0)
        if KV_FP8:
            k1, k1s = fp8_quantize_rows(k1, 0)
            v1, v1s = fp8_quantize_rows(v1, 0)
            s_ptr = page * stride_sp + row * stride_sr + offs_d * 0  # one address; lane 0 stores
            s_ok = offs_d < tl.where(slot >= 0, 1, 0)
            tl.store(ks_base + s_ptr, (offs_d * 0 + k1s).to(k_scale.dtype.element_ty), mask=s_ok)
            tl.store(vs_base + s_ptr, (offs_d * 0 + v1s).to(v_scale.dtype.element_ty), mask=s_ok)
        # No item reads this row in this launch: the owner attends to it from registers, below.
        tl.store(k_base + page * stride_kp + row * stride_kr + offs_d, k1.to(k_cache.dtype.element_ty), mask=w_ok)
        tl.store(v_base + page * stride_vp + row * stride_vr + offs_d, v1.to(v_cache.dtype.element_ty), mask=w_ok)
        # The key and value as the cache holds them, so the new token scores exactly as it will in later steps.
        kf = k1.to(k_cache.dtype.element_ty).to(tl.float32)
        vf = v1.to(v_cache.dtype.element_ty).to(tl.float32)
        if KV_FP8:
            kf = kf * k1s
            vf = vf * v1s
    q_mm, qk_mm, softcap_mm = q, qk_scale, softcap_scale
    if F16_DOT:
        q_mm, q_s = _fp16_rows(q)
        qk_mm = qk_scale * q_s
        softcap_mm = softcap_scale * q_s

    hi_cache = tl.where(owns_new, s_hi - 1, s_hi)  # keys read from the cache
    s_full = s_lo + ((hi_cache - s_lo) // BLOCK_N) * BLOCK_N  # end of the full tiles
    pos = tl.zeros([BLOCK_H], dtype=tl.int32) + (hi_cache - 1)  # every key of [lo, hi) is visible
    alibi = tl.zeros([BLOCK_H], dtype=tl.float32)
    apos = tl.zeros([BLOCK_H], dtype=tl.int32)
    if HAS_ALIBI:  # the query sits at the sequence's last position; the new key's own bias is 0
        alibi = tl.load(alibi_ptr + head, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        apos = apos + (tl.load(seq_lens_kv + seq).to(tl.int32) - 1)

    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    pt_row = page_table + seq.to(tl.int64) * stride_pt

    if PAGE_TILES:
        acc, m_i, l_i = _attn_pages(
            acc, m_i, l_i, q_mm, s_lo, hi_cache, k_base, v_base, pt_row, stride_kp, stride_kr, stride_vp, stride_vr,
            qk_mm, softcap_mm, softcap_log2, alibi, apos, ks_base, vs_base, stride_sp, stride_sr, PAGE_SIZE,
            HEAD_D, BLOCK_D, NEED_DMASK, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8,
        )  # fmt: skip
    else:
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q_mm, pos, s_lo, s_full, k_base, v_base, pt_row,
            stride_kp, stride_kr, stride_vp, stride_vr, qk_mm, softcap_mm, softcap_log2, 0, alibi, apos, ks_base, vs_base, stride_sp, stride_sr,
            PAGE_SIZE, HEAD_D, BLOCK_D, BLOCK_N, NEED_DMASK, False, False, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8,
        )  # fmt: skip
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q_mm, pos, s_full, hi_cache, k_base, v_base, pt_row,
            stride_kp, stride_kr, stride_vp, stride_vr, qk_mm, softcap_mm, softcap_log2, 0, alibi, apos, ks_base, vs_base, stride_sp, stride_sr,
            PAGE_SIZE, HEAD_D, BLOCK_D, BLOCK_N, NEED_DMASK, True, False, HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8,
        )  # fmt: skip

    if NEW_KV:
        if owns_new:
            s = tl.sum(q.to(tl.float32) * kf[None, :], 1)
            if HAS_SOFTCAP:
                s = softcap_log2 * _tanh(s * softcap_scale)
            else:
                s = s * qk_scale
            m_new = tl.maximum(m_i, s)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vf[None, :]
            m_i = m_new

    _store_item(acc, m_i, l_i, w, seq, kvh, tok, n_items, head, h_ok, offs_d, d_ok, out_ptr, mid_o, mid_lse,
                tickets, split_start, sinks_ptr, stride_ot, stride_oh, stride_mow, stride_moh, stride_mlw, BLOCK_H,
                BLOCK_D, HAS_SINKS, MERGE)  # fmt: skip


@triton.jit
def _store_item(acc, m_i, l_i, w, seq, kvh, tok, n_items, head, h_ok, offs_d, d_ok, out_ptr, mid_o, mid_lse,
                tickets, split_start, sinks_ptr, stride_ot, stride_oh, stride_mow, stride_moh, stride_mlw,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr, MERGE: tl.constexpr):
    """A work item's result: the output itself when the sequence has one item, else the normalised partial and
    base-2 LSE (merged by :func:`_decode_reduce_kernel`, or MERGE: by the last item, :func:`_merge_last`)."""
    if n_items == 1:
        o = _finalize(acc, m_i, l_i, sinks_ptr, head, h_ok, HAS_SINKS)
        o_ptrs = out_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        w64 = w.to(tl.int64)
        mo_ptrs = mid_o + w64 * stride_mow + head[:, None] * stride_moh + offs_d[None, :]
        tl.store(mo_ptrs, acc / l_safe[:, None], mask=h_ok[:, None] & d_ok[None, :])
        tl.store(mid_lse + w64 * stride_mlw + head, lse, mask=h_ok)
        if MERGE:
            _merge_last(mid_o, mid_lse, tickets, split_start, sinks_ptr, out_ptr, seq, kvh, tok, n_items, head,
                        h_ok, offs_d, d_ok, stride_mow, stride_moh, stride_mlw, stride_ot, stride_oh, BLOCK_H,
                        BLOCK_D, HAS_SINKS)  # fmt: skip


@triton.jit
def _blocks_step(
    acc, m_i, l_i, acc_s, q3, start, lo, hi, k_base, v_base, ks_base, vs_base, pt_row, k_off, v_off, stride_kp,
    stride_kr, stride_vp, stride_vr, stride_sp, stride_sr, qk_mm, softcap_mm, softcap_log2, alibi, apos,
    PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
    HEAD_D: tl.constexpr, NEED_DMASK: tl.constexpr, MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, KV_FP8: tl.constexpr,
):
    """One iteration of :func:`_decode_blocks_kernel`: the BLOCKS blocks of keys from ``start`` (block-aligned),
    each folded into its own softmax state (the accumulator holds ``acc * acc_s`` per row: :func:`_pv`'s V
    scale, factored out). MASK: only keys in ``[lo, hi)`` count (the range's ragged ends);
    without it every key of every block is in range (no load or score masks)."""
    offs_b = tl.arange(0, BLOCKS)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    b0 = start + offs_b * BLOCK_N  # each block's first key
    j = b0[:, None] + offs_n[None, :]  # [BLOCKS, N]
    j_ok = (j >= lo) & (j < hi)
    if MASK:
        page = tl.load(pt_row + b0 // PAGE_SIZE, mask=b0 < hi, other=0).to(tl.int64)
    else:
        page = tl.load(pt_row + b0 // PAGE_SIZE).to(tl.int64)
    row0 = (b0 % PAGE_SIZE).to(tl.int64)
    d_ok = offs_d < HEAD_D
    kt = _load2d(k_base + (page * stride_kp + row0 * stride_kr)[:, None, None] + k_off, j_ok[:, None, :],
                 d_ok[None, :, None], MASK, NEED_DMASK)  # [BLOCKS, D, N]
    v = _load2d(v_base + (page * stride_vp + row0 * stride_vr)[:, None, None] + v_off, j_ok[:, :, None],
                d_ok[None, None, :], MASK, NEED_DMASK)  # [BLOCKS, N, D]
    if KV_FP8:
        s_off = page[:, None] * stride_sp + (row0[:, None] + offs_n[None, :]) * stride_sr
        if MASK:
            k_s = tl.load(ks_base + s_off, mask=j_ok, other=0.0).to(tl.float32)
            v_s = tl.load(vs_base + s_off, mask=j_ok, other=0.0).to(tl.float32)
        else:
            k_s = tl.load(ks_base + s_off).to(tl.float32)
            v_s = tl.load(vs_base + s_off).to(tl.float32)
        kt = kt.to(q3.dtype)
        v = v.to(q3.dtype)
    qk = _dot(q3, kt, UPCAST, IEEE)  # [BLOCKS, M, N] fp32
    if KV_FP8:
        qk = qk * k_s[:, None, :]
    if HAS_SOFTCAP:
        qk = softcap_log2 * _tanh(qk * softcap_mm)
    else:
        qk = qk * qk_mm
    if HAS_ALIBI:
        qk = qk + alibi[None, :, None] * (j[:, None, :] - apos[None, :, None]).to(tl.float32)
    if MASK:
        qk = tl.where(j_ok[:, None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 2))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, :, None])
    l_i = l_i * alpha + tl.sum(p, 2)
    if KV_FP8:
        # As _pv, the weights take the V scales relative to the block's largest (powers of two: exact); the
        # block's largest is not multiplied back into the product but kept as the accumulator's unit (``acc_s``,
        # per row), so the rescale stays one multiply-add per accumulator element.
        v_top = tl.max(v_s, 1)
        v_max = tl.maximum(v_top, 1.1754943508222875e-38)
        p = p * (v_s * (1.0 / v_max)[:, None])[:, None, :]
        unit = tl.where(v_top[:, None] > 0.0, v_max[:, None], acc_s)  # a block with no keys keeps its unit
        acc = acc * (alpha * acc_s / unit)[:, :, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
        acc_s = unit
    else:
        acc = acc * alpha[:, :, None] + _dot(p.to(v.dtype), v, UPCAST, IEEE)
    return acc, m_new, l_i, acc_s


@triton.jit(do_not_specialize=["stride_pt"])
def _decode_blocks_kernel(
    q_ptr, k_cache, v_cache, out_ptr,
    cu_seqlens_q, seq_lens_kv, page_table, work_ptr, split_start, sinks_ptr, alibi_ptr, mid_o, mid_lse,
    tickets, k_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kp, stride_kr, stride_kh, stride_vp, stride_vr, stride_vh,
    stride_pt, stride_mow, stride_moh, stride_mlw, stride_sp, stride_sr,
    qk_scale, softcap_scale, softcap_log2,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
    NEED_DMASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    KV_FP8: tl.constexpr, F16_DOT: tl.constexpr, MERGE: tl.constexpr,
):
    """The decode split kernel over a complete cache (the new token already written), as :func:`_decode_kernel`
    without NEW_KV, with the keys of an item taken BLOCKS blocks of BLOCK_N at a time as one batched dot
    (``[BLOCKS, M, D] x [BLOCKS, D, BLOCK_N]``; a block lies inside one page). A batched dot puts its warps
    along the batch, so each warp owns its blocks: its own running max, denominator and accumulator, and the
    scores reach the P @ V dot without leaving the warp. Nothing crosses warps until the blocks' partial
    softmaxes merge once, after the loop (a tiled kernel reduces across warps at every tile)."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    seq, lo, hi, n_items = _work_item(work_ptr, split_start, w)
    if seq < 0:
        return

    head, h_ok, offs_d, d_ok = _group_heads(kvh, GROUP, BLOCK_H, BLOCK_D, HEAD_D)
    tok = tl.load(cu_seqlens_q + seq).to(tl.int64)
    k_base = k_cache + kvh.to(tl.int64) * stride_kh
    v_base = v_cache + kvh.to(tl.int64) * stride_vh
    ks_base = k_scale + kvh.to(tl.int64)
    vs_base = v_scale + kvh.to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    qk_mm, softcap_mm = qk_scale, softcap_scale
    if F16_DOT:
        q, q_s = _fp16_rows(q)
        qk_mm = qk_scale * q_s
        softcap_mm = softcap_scale * q_s
    q3 = tl.broadcast_to(q[None, :, :], (BLOCKS, BLOCK_H, BLOCK_D))
    alibi = tl.zeros([BLOCK_H], dtype=tl.float32)
    apos = tl.zeros([BLOCK_H], dtype=tl.int32)
    if HAS_ALIBI:  # the query sits at the sequence's last position
        alibi = tl.load(alibi_ptr + head, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        apos = apos + (tl.load(seq_lens_kv + seq).to(tl.int32) - 1)

    offs_n = tl.arange(0, BLOCK_N)
    k_off = offs_n[None, None, :] * stride_kr + offs_d[None, :, None]  # [1, D, N]: K^T of a block
    v_off = offs_n[None, :, None] * stride_vr + offs_d[None, None, :]  # [1, N, D]
    acc = tl.zeros([BLOCKS, BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCKS, BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCKS, BLOCK_H], dtype=tl.float32)
    acc_s = tl.full([BLOCKS, BLOCK_H], 1.0, dtype=tl.float32)  # the accumulator's unit per row (KV_FP8)
    pt_row = page_table + seq.to(tl.int64) * stride_pt
    step: tl.constexpr = BLOCKS * BLOCK_N
    first_full = ((lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N  # whole iterations: [first_full, last_full)
    last_full = first_full + tl.maximum(hi - first_full, 0) // step * step
    for part in tl.static_range(2):  # masked: the keys before the first whole block, then those after the last
        if part == 0:  # the head block: keys [lo, first_full), or the whole range inside one block
            start = (lo // BLOCK_N) * BLOCK_N
            end = tl.minimum(hi, first_full)
            run = (lo % BLOCK_N != 0) & (lo < hi)
        else:
            start = last_full
            end = hi
            run = last_full < hi
        if run:
            acc, m_i, l_i, acc_s = _blocks_step(
                acc, m_i, l_i, acc_s, q3, start, lo, end, k_base, v_base, ks_base, vs_base, pt_row, k_off, v_off,
                stride_kp, stride_kr, stride_vp, stride_vr, stride_sp, stride_sr, qk_mm, softcap_mm, softcap_log2,
                alibi, apos, PAGE_SIZE, BLOCK_D, BLOCK_N, BLOCKS, HEAD_D, NEED_DMASK, True, HAS_SOFTCAP, HAS_ALIBI,
                UPCAST, IEEE, KV_FP8)  # fmt: skip
        if part == 0:
            for start in range(first_full, last_full, step):
                acc, m_i, l_i, acc_s = _blocks_step(
                    acc, m_i, l_i, acc_s, q3, start, lo, hi, k_base, v_base, ks_base, vs_base, pt_row, k_off, v_off,
                    stride_kp, stride_kr, stride_vp, stride_vr, stride_sp, stride_sr, qk_mm, softcap_mm,
                    softcap_log2, alibi, apos, PAGE_SIZE, BLOCK_D, BLOCK_N, BLOCKS, HEAD_D, NEED_DMASK, False,
                    HAS_SOFTCAP, HAS_ALIBI, UPCAST, IEEE, KV_FP8)  # fmt: skip
    m = tl.max(m_i, 0)  # the blocks' partial softmaxes, merged once
    alpha = tl.exp2(m_i - m[None, :])
    l_m = tl.sum(l_i * alpha, 0)
    acc_m = tl.sum(acc * (alpha * acc_s)[:, :, None], 0)
    _store_item(acc_m, m, l_m, w, seq, kvh, tok, n_items, head, h_ok, offs_d, d_ok, out_ptr, mid_o, mid_lse,
                tickets, split_start, sinks_ptr, stride_ot, stride_oh, stride_mow, stride_moh, stride_mlw, BLOCK_H,
                BLOCK_D, HAS_SINKS, MERGE)  # fmt: skip


@triton.jit
def _decode_reduce_kernel(
    mid_o,
    mid_lse,
    cu_seqlens_q,
    split_start,
    sinks_ptr,
    out_ptr,
    HQ,
    stride_mow,
    stride_moh,
    stride_mlw,
    stride_ot,
    stride_oh,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEADS: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    PDL: tl.constexpr,
):
    """Grid ``(S, cdiv(Hq, HEADS))``: merge a sequence's split partials (workspace rows
    ``split_start[s]:split_start[s+1]``, at most BLOCK_S of them) with LSE weights, all loaded at once, for HEADS
    query heads; the sink joins the max and the denominator. Sequences with 0 items (prefill) or 1 item (already
    written by the split kernel) exit at once."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    s = tl.program_id(0)
    first = tl.load(split_start + s)
    n = tl.load(split_start + s + 1) - first
    if n <= 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    rows = (first + offs_s).to(tl.int64)
    tok = tl.load(cu_seqlens_q + s).to(tl.int64)
    for i in tl.static_range(HEADS):
        h = tl.program_id(1) * HEADS + i
        if h < HQ:
            lse = tl.load(mid_lse + rows * stride_mlw + h, mask=s_ok, other=float("-inf"))
            parts = tl.load(mid_o + rows[:, None] * stride_mow + h * stride_moh + offs_d[None, :],
                            mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            m = tl.max(lse, 0)
            if HAS_SINKS:
                sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
                m = tl.maximum(m, sink)
            m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights are 0
            w = tl.exp2(lse - m)
            denom = tl.sum(w, 0)
            if HAS_SINKS:
                denom += tl.exp2(sink - m)
            denom = tl.where(denom == 0.0, 1.0, denom)
            o = tl.sum(parts * w[:, None], 0) / denom
            tl.store(out_ptr + tok * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


# Programs per SM above which the reduction takes several query heads per program. With many sequences most have
# one split and their programs exit at once, yet launching ``S x Hq`` of them (8,192 at 256 sequences) costs
# microseconds per layer after the split kernel ends; few sequences keep one head per program (latency).
REDUCE_CTAS_PER_SM = 4.0


def reduce_heads(num_seqs: int, hq: int, sms: int) -> int:
    """Query heads per reduction program: 1 until ``S x Hq`` programs exceed REDUCE_CTAS_PER_SM per SM, then
    doubled (at most 8) until they do not."""
    heads = 1
    while num_seqs * hq > REDUCE_CTAS_PER_SM * sms * heads and heads < min(8, hq):
        heads *= 2
    return heads


# How a sequence's splits are merged: by the reduction kernel, or by the last split item of the sequence, which
# takes an atomic ticket. The ticket saves the reduction's launch but puts a barrier, an atomic and the merge on
# the exit of every item of a split sequence; measured on the H200 neither wins throughout (docs/performance.md:
# 1B b=32 2% faster, b=64 6% slower, b=256 and 8B fp8 b=256 within 1%). "auto" takes the ticket where the launch
# is short (:func:`short_context_launch`): there nearly every sequence is one item, which stores its output
# directly, so the ticket costs nothing and the reduction launch (thousands of programs that find nothing to
# merge) is saved. ``AUTODEPLOY_DECODE_MERGE`` overrides the rule.
MERGE_MODES = ("auto", "reduce", "ticket")


def _env_choice(var: str, modes: tuple[str, ...]) -> str:
    """The override ``var`` names (one of ``modes``; unset or empty: "auto")."""
    mode = os.environ.get(var, "auto") or "auto"
    if mode not in modes:
        raise ValueError(f"{var} must be one of {modes}, got {mode!r}")
    return mode


def merge_in_kernel(short: bool = False) -> bool:
    """Whether the split kernel merges the splits itself (``AUTODEPLOY_DECODE_MERGE``; see MERGE_MODES);
    ``short``: the launch is a short-context one (:func:`short_context_launch`)."""
    mode = _env_choice("AUTODEPLOY_DECODE_MERGE", MERGE_MODES)
    return mode == "ticket" or (mode == "auto" and short)


_TICKETS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # replaced ticket buffers stay allocated: captured graphs still address them


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets for the in-kernel merge, one per (sequence, KV head), shared by every layer: a launch
    leaves them zero (the last item of each sequence resets its own), so launches on one device must not overlap
    (one stream per device, as the engine runs). Sized generously once so that a CUDA-graph capture never has to
    grow them."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        if t is not None:
            _OUTGROWN.append(t)
        t = torch.zeros(max(n, 16384, 2 * (t.numel() if t is not None else 0)), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


# ----------------------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------------------


def _common_checks(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                   k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None) -> None:
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}")
    if k_scale is not None or v_scale is not None:
        check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    elif k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError("q, k_cache and v_cache must share a dtype")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache/v_cache must be [num_pages, page_size, Hkv, D] with equal shapes")
    if q.dim() != 3 or out.shape != q.shape:
        raise ValueError("q/out must be [tokens, Hq, D] with equal shapes")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError("head_dim mismatch between q and the cache")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError("Hq must be a multiple of Hkv")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in the head dim")


@dataclass
class NewTokenKV:
    """The step's new K/V rows (flattened ``[T, Hkv, D]``, any row/head strides) that the decode launch writes
    into the cache at ``slot_mapping`` (negative = skip); with ``cos``/``sin`` ``[T, R]`` (HF rotate_half
    layout) q and k are rotated first."""

    k: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None

    def check(self, q: torch.Tensor, k_cache: torch.Tensor) -> None:
        t, hkv, d = q.shape[0], k_cache.shape[2], k_cache.shape[3]
        if self.k.shape != (t, hkv, d) or self.v.shape != (t, hkv, d):
            raise ValueError(f"new k/v must be [{t}, {hkv}, {d}], got {tuple(self.k.shape)}, {tuple(self.v.shape)}")
        if self.k.stride(-1) != 1 or self.v.stride(-1) != 1:
            raise ValueError("new k/v must be contiguous in the head dim")
        if self.slot_mapping.shape != (t,):
            raise ValueError(f"slot_mapping must be [{t}], got {tuple(self.slot_mapping.shape)}")
        if self.cos is not None:
            r = self.cos.shape[-1]
            if self.cos.shape != (t, r) or self.sin is None or self.sin.shape != (t, r) or r % 2 or r > d:
                raise ValueError(f"cos/sin must be [{t}, R] with R even and <= {d}")
            if self.cos.stride(-1) != 1 or self.sin.stride(-1) != 1:
                raise ValueError("cos/sin must be contiguous in the rotary dim")


def _score_params(scale: float, logit_softcap: Optional[float]):
    """(HAS_SOFTCAP, qk_scale, softcap_scale, softcap_log2) for the base-2 softmax."""
    if logit_softcap is not None and logit_softcap > 0:
        return True, 1.0, float(scale) / float(logit_softcap), float(logit_softcap) * _LOG2E
    return False, float(scale) * _LOG2E, 1.0, 1.0


def _window(sliding_window: Optional[int]):
    """(HAS_WINDOW, window); a window <= 0 means none (same convention as the torch reference)."""
    if sliding_window is not None and sliding_window > 0:
        return True, int(sliding_window)
    return False, 0


def _context_config(block_d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the context kernel."""
    if _interpreting():
        return 32, 32, 4, 1
    env = os.environ.get("AUTODEPLOY_CONTEXT_CONFIG")  # tuning (benchmarks): "BLOCK_M,BLOCK_N,warps,stages"
    if env:
        return tuple(int(v) for v in env.split(","))
    if dtype == torch.float32:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2  # D=256: keep the fp32 accumulator out of spills


# A decode KV tile is one whole page (one scalar page lookup, loop-invariant offsets) when the page size allows;
# else keys are gathered one by one. Measured on H100 for the production launch (RoPE + new-token write +
# attention; bench_triton_attention.py --variants, Hq/Hkv 32/8, D 128, page 64, read-flushed L2): page tiles vs
# gathered B=1 1k/32k 14.7/58.9 vs 16.8/63.7 us, B=16 8k 195.7 vs 205.8, B=32 8k 381.5 vs 396.3, B=64 1k/8k
# 114.3/797.7 vs 124.4/859.9, B=128 2k 373.0 vs 383.1 us. (The plain kernel without the new token gathers faster
# at B=64, 724 vs 784 us at 8k, which is why an earlier version switched to gathering from 64 sequences on; the
# launch that serving runs is the one above.)
DECODE_PAGE_TILES = True
_PAGE_TILE_SIZES = (16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def _max_shared_mem(device_index: int) -> int:
    """Shared memory one program may use on the device (bytes), as Triton's driver reports it."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - an unknown driver: assume the smallest, so the shallow pipeline is used
        return 0


# Decode split-kernel pipeline depth: 5 stages of one page tile of K and of V where shared memory holds them
# (measured on an H200, docs/performance.md), else 3.
_DEEP_STAGES, _DEEP_STAGES_SMEM = 5, 200 * 1024
# A launch whose cache holds at most this many tokens per sequence takes the short-context config (_decode_config).
SHORT_CONTEXT_KEYS = 1024
SHORT_MIN_PROGRAMS = 4.0  # ... and at least this many (sequence, KV head) programs per SM


def short_context_launch(k_cache: torch.Tensor, num_seqs: int, device: torch.device) -> tuple[int, float, bool]:
    """(keys per sequence, programs per SM, short): the bound ``_decode_config`` and :func:`new_token_mode`
    choose by. Keys per sequence is the cache's token capacity over the launch's sequences, an upper bound on
    their mean context known at capture; programs are (sequence, KV head) pairs. Both count every sequence of
    the launch, prefill ones of a mixed step included (their programs exit at once). Only compiled kernels on a
    GPU take the short launch (the interpreter keeps the general one)."""
    keys = k_cache.shape[0] * k_cache.shape[1] // max(num_seqs, 1)
    if device.type != "cuda" or _interpreting():
        return keys, 0.0, False
    per_sm = num_seqs * k_cache.shape[2] / device_sms(device)
    return keys, per_sm, keys <= SHORT_CONTEXT_KEYS and per_sm >= SHORT_MIN_PROGRAMS


# How a decode step's new token reaches the cache: written by the split kernel itself, which also rotates q and
# attends to the new key from registers ("fused": one launch), or by the RoPE + cache-write kernel first, the
# split kernel then reading a complete cache ("separate": two launches, and no per-program new-token chain ahead
# of the page loop). ``AUTODEPLOY_DECODE_NEW_TOKEN`` overrides the rule (benchmarks, tests).
NEW_TOKEN_MODES = ("auto", "fused", "separate")


def new_token_mode(k_cache: torch.Tensor, num_seqs: int, device: torch.device) -> str:
    """"fused" or "separate" for a decode launch (NEW_TOKEN_MODES): separate where the launch is short
    (:func:`short_context_launch`: many programs over a few pages each, where the fused launch's fixed
    per-program work sets the time), fused otherwise (batch 1 and long contexts: one launch less)."""
    mode = _env_choice("AUTODEPLOY_DECODE_NEW_TOKEN", NEW_TOKEN_MODES)
    if mode != "auto":
        return mode
    return "separate" if short_context_launch(k_cache, num_seqs, device)[2] else "fused"


def _decode_config(block_d: int, dtype: torch.dtype, device: Optional[torch.device] = None,
                   keys_per_seq: Optional[int] = None, programs_per_sm: float = 0.0, kv_fp8: bool = False,
                   max_smem: Optional[int] = None):
    """(BLOCK_N, num_warps, num_stages) for the decode split kernel (memory bound: deep pipelining).

    ``keys_per_seq``: an upper bound on the launch's mean context, the cache's token capacity over its
    sequences (known at capture, unlike the contexts themselves). Where it is short (a large batch in a cache
    sized for it: continuous batching at hundreds of sequences), each program reduces a few pages, and
    programs per SM, not pipeline depth, hide the latency: 2-warp programs, where there are enough of them
    (``programs_per_sm``: sequences x KV heads over SMs; measured on the H200, docs/performance.md), with 3
    stages over a bf16 cache and 5 over an FP8 one (``kv_fp8``; each the faster for its cache on the H200).
    Prefix-shared pages can put the true mean above the bound; that costs speed only."""
    if _interpreting():
        return 32, 4, 1
    env = os.environ.get("AUTODEPLOY_DECODE_CONFIG")  # tuning (benchmarks): "BLOCK_N,warps,stages[,maxnreg]"
    if env:
        return tuple(int(v) for v in env.split(","))
    if dtype == torch.float32 or block_d > 128:
        return 32, 4, 2
    if max_smem is None:  # the device's (given: the offline compile check's target)
        max_smem = _max_shared_mem(device.index or 0) if device is not None and device.type == "cuda" else 0
    deep = max_smem >= _DEEP_STAGES_SMEM
    if keys_per_seq is not None and keys_per_seq <= SHORT_CONTEXT_KEYS and programs_per_sm >= SHORT_MIN_PROGRAMS:
        return 64, 2, _DEEP_STAGES if deep and kv_fp8 else 3
    return 64, 4, _DEEP_STAGES if deep else 3


# Which kernel a decode launch over a complete cache (no new token to write) runs: the tiled split kernel
# (``_decode_kernel``, one page per tile, its warps sharing each tile) or the block kernel
# (``_decode_blocks_kernel``, each warp owning key blocks, one merge at the end). ``AUTODEPLOY_DECODE_KERNEL``
# overrides the rule (benchmarks, tests).
DECODE_KERNELS = ("auto", "tiles", "blocks")


def blocks_kernel(k_cache: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode launch over ``k_cache`` with queries of ``dtype`` on ``device`` runs the block kernel
    (DECODE_KERNELS). Only when asked for: it has not been timed on a GPU yet (``run_gpu_pending.sh``
    PART=blocks times it), so "auto" keeps the tiled kernel. The page size must hold whole blocks of 16 keys
    and the head dim be at most 128 (the per-warp accumulator)."""
    mode = _env_choice("AUTODEPLOY_DECODE_KERNEL", DECODE_KERNELS)
    if k_cache.shape[1] % 16 or k_cache.shape[-1] > 128:
        return False
    return mode == "blocks"


def _blocks_config(page_size: int, keys_per_seq: Optional[int] = None, programs_per_sm: float = 0.0):
    """(BLOCK_N, BLOCKS, num_warps, num_stages) for the block kernel: blocks of BLOCK_N keys (inside one page),
    BLOCKS of them per iteration, one block per warp."""
    if _interpreting():
        return 16, 2, 2, 1
    env = os.environ.get("AUTODEPLOY_DECODE_BLOCKS_CONFIG")  # tuning (benchmarks): "BLOCK_N,BLOCKS,warps,stages"
    if env:
        return tuple(int(v) for v in env.split(","))
    return 16, 4, 4, 3  # 16-key blocks: 32-key ones spill on sm_90 (compile_check decode/fp8_kv/blocks/*)


def _scale_strides(k_scale: Optional[torch.Tensor]) -> tuple[int, int]:
    """(page, row) strides of an FP8 cache's scale tensors (checked equal for K and V), or zeros."""
    return (k_scale.stride(0), k_scale.stride(1)) if k_scale is not None else (0, 0)


def _search_steps(num_seqs: int) -> int:
    """Halvings that find a program's sequence among ``num_seqs`` (rounded up to a multiple of 4: each value is
    a compiled variant, and every token bucket of the whole-step graphs has its own sequence count)."""
    return -(-num_seqs.bit_length() // 4) * 4


def context_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    page_table: torch.Tensor,
    out: torch.Tensor,
    *,
    num_seqs: int,
    scale: float,
    sliding_window: Optional[int],
    logit_softcap: Optional[float],
    sinks: Optional[torch.Tensor],
    max_q_len: Optional[int] = None,
    skip_single: bool = False,
    alibi_slopes: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Causal paged attention for prefill/extend sequences, written into ``out`` ``[Tq, Hq, D]``.

    ``cu_seqlens_q[:num_seqs+1]`` are the query offsets into q/out, ``seq_lens_kv[s]`` the total KV length
    (cached + new, already in the cache), ``page_table[s]`` the sequence's pages. ``max_q_len`` (a host int,
    an upper bound on any sequence's new tokens) sizes a grid per sequence; without it the grid depends only on
    ``Tq`` and ``num_seqs`` (no device value is read on the host: CUDA-graph capturable). ``skip_single``
    leaves one-token sequences (decodes) and empty ones alone. ``alibi_slopes`` ``[Hq]`` (fp32) adds
    ``slope[h] * (j - i)`` to the scores. ``k_scale``/``v_scale``: an FP8 cache's scales (ops/kv_quant.py).
    """
    _common_checks(q, k_cache, v_cache, out, k_scale, v_scale)
    if num_seqs <= 0 or q.shape[0] == 0 or max_q_len == 0:
        return
    t, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    block_d = triton.next_power_of_2(max(d, 16))
    block_m, block_n, num_warps, num_stages = _context_config(block_d, q.dtype)
    has_softcap, qk_scale, softcap_scale, softcap_log2 = _score_params(scale, logit_softcap)
    has_window, window = _window(sliding_window)
    interp = _interpreting()
    flat = max_q_len is None
    if flat:
        grid = (triton.cdiv(t * group, block_m) + num_seqs, hkv)
    else:
        grid = (triton.cdiv(max_q_len * group, block_m), num_seqs, hkv)
    _context_attn_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q, seq_lens_kv, page_table,
        sinks if sinks is not None else q, alibi_slopes if alibi_slopes is not None else q,
        k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0), *_scale_strides(k_scale),
        qk_scale, softcap_scale, softcap_log2, window, num_seqs,
        GROUP=group, PAGE_SIZE=page_size, HEAD_D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        NEED_DMASK=block_d != d, HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap, HAS_SINKS=sinks is not None,
        HAS_ALIBI=alibi_slopes is not None, FLAT_GRID=flat, SEARCH_STEPS=_search_steps(num_seqs) if flat else 0, SKIP_SINGLE=skip_single,
        UPCAST=interp, IEEE=q.dtype == torch.float32, KV_FP8=k_scale is not None, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens_kv: torch.Tensor,
    page_table: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float,
    sliding_window: Optional[int],
    logit_softcap: Optional[float],
    sinks: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor] = None,
    partition: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    target: Optional[int] = None,
    new_kv: Optional[NewTokenKV] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
) -> None:
    """Flash-decoding over the paged cache for the decode sequences (``q_len == 1``) of a flattened batch,
    in one launch.

    ``cu_seqlens_q`` ``[S+1]`` locates each sequence's query row in q/out (default: one row per sequence,
    q/out ``[S, Hq, D]``); prefill rows are left untouched. ``partition`` is the ``(work, split_start)`` table of
    :func:`~autodeploy.backends.triton.partition.derive_partition` (in a compiled graph it comes from the
    metadata node); when None it is derived here with ``target`` work items (default: two waves of programs).
    ``new_kv``: the step's new K/V (and RoPE inputs), written into the cache by this launch; without it
    the cache must already hold the new token and q is used as is.
    No device value is read on the host, so this is CUDA-graph capturable. ``k_scale``/``v_scale``: an FP8
    cache's scales (the new token is quantized as it is written).
    """
    _common_checks(q, k_cache, v_cache, out, k_scale, v_scale)
    num_seqs = seq_lens_kv.shape[0]
    if num_seqs == 0 or q.shape[0] == 0:
        return
    _, hq, d = q.shape
    _, page_size, hkv, _ = k_cache.shape
    if cu_seqlens_q is None:
        cu_seqlens_q = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    _, window = _window(sliding_window)
    if partition is None:
        if target is None:
            target = target_work_items(hkv, device_sms(q.device))
        partition = derive_partition(seq_lens_kv, cu_seqlens_q, target=target, window=window)
    work, split_start = partition
    nk = new_kv if new_kv is not None else NewTokenKV(q, q, q[:, 0, 0])  # placeholders: NEW_KV=False
    if new_kv is not None:
        new_kv.check(q, k_cache)
    rope = new_kv is not None and new_kv.cos is not None
    cos, sin = (nk.cos, nk.sin) if rope else (q, q)
    group = hq // hkv
    block_d = triton.next_power_of_2(max(d, 16))
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    has_softcap, qk_scale, softcap_scale, softcap_log2 = _score_params(scale, logit_softcap)
    keys_per_seq, per_sm, short = short_context_launch(k_cache, num_seqs, q.device)
    # cap: [maxnreg] (tuning)
    block_n, num_warps, num_stages, *cap = _decode_config(block_d, q.dtype, q.device, keys_per_seq, per_sm,
                                                          k_scale is not None)
    page_tiles = DECODE_PAGE_TILES and page_size in _PAGE_TILE_SIZES and page_size * block_d <= 128 * 128
    if page_tiles:
        block_n = page_size
    n_items = work.shape[0]
    merge = merge_in_kernel(short)
    tickets = _tickets(q.device, num_seqs * hkv) if merge else seq_lens_kv
    pdl = pdl_enabled(q.device, "decode")
    pdl_reduce = pdl_enabled(q.device, "reduce")
    mid_o = torch.empty((n_items, hq, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((n_items, hq), dtype=torch.float32, device=q.device)
    sinks_arg = sinks if sinks is not None else q
    if new_kv is None and blocks_kernel(k_cache, q.dtype, q.device):
        block_n, blocks, num_warps, num_stages = _blocks_config(page_size, keys_per_seq, per_sm)
        _decode_blocks_kernel[(n_items, hkv)](
            q, k_cache, v_cache, out, cu_seqlens_q, seq_lens_kv, page_table, work, split_start, sinks_arg,
            alibi_slopes if alibi_slopes is not None else q, mid_o, mid_lse, tickets,
            k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), *_scale_strides(k_scale),
            qk_scale, softcap_scale, softcap_log2,
            GROUP=group, BLOCK_H=block_h, PAGE_SIZE=page_size, HEAD_D=d, BLOCK_D=block_d, BLOCK_N=block_n,
            BLOCKS=blocks, NEED_DMASK=block_d != d, HAS_SOFTCAP=has_softcap, HAS_SINKS=sinks is not None,
            HAS_ALIBI=alibi_slopes is not None, UPCAST=_interpreting(), IEEE=q.dtype == torch.float32, PDL=pdl,
            KV_FP8=k_scale is not None, F16_DOT=k_scale is not None and q.dtype != torch.float32, MERGE=merge,
            num_warps=num_warps, num_stages=num_stages, **launch_options(pdl),
        )  # fmt: skip
    else:
        _decode_kernel[(n_items, hkv)](
            q, nk.k, nk.v, cos, sin, nk.slot_mapping, k_cache, v_cache, out,
            cu_seqlens_q, seq_lens_kv, page_table, work, split_start, sinks_arg,
            alibi_slopes if alibi_slopes is not None else q, mid_o, mid_lse, tickets,
            k_scale if k_scale is not None else q, v_scale if v_scale is not None else q,
            q.stride(0), q.stride(1), nk.k.stride(0), nk.k.stride(1), nk.v.stride(0), nk.v.stride(1),
            cos.stride(0), sin.stride(0), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0), mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), *_scale_strides(k_scale),
            qk_scale, softcap_scale, softcap_log2,
            GROUP=group, BLOCK_H=block_h, PAGE_SIZE=page_size, HEAD_D=d, BLOCK_D=block_d,
            BLOCK_N=block_n, NEED_DMASK=block_d != d, HAS_SOFTCAP=has_softcap,
            HAS_SINKS=sinks is not None, HAS_ALIBI=alibi_slopes is not None, NEW_KV=new_kv is not None,
            ROPE=rope, ROT=cos.shape[-1] if rope else 0, PAGE_TILES=page_tiles,
            EMULATE_RNE=emulate_rne(_decode_kernel, q.dtype), UPCAST=_interpreting(),
            IEEE=q.dtype == torch.float32, PDL=pdl, KV_FP8=k_scale is not None,
            F16_DOT=k_scale is not None and q.dtype != torch.float32, MERGE=merge, num_warps=num_warps,
            num_stages=num_stages, **launch_options(pdl), **({"maxnreg": cap[0]} if cap else {}),
        )  # fmt: skip
    if merge:
        return
    # One sequence has at most target + 1 splits (partition.py), and target = items - sequences.
    max_splits = max(2, n_items - num_seqs + 1)
    heads = reduce_heads(num_seqs, hq, device_sms(q.device))
    _decode_reduce_kernel[(num_seqs, triton.cdiv(hq, heads))](
        mid_o, mid_lse, cu_seqlens_q, split_start, sinks_arg, out, hq,
        mid_o.stride(0), mid_o.stride(1), mid_lse.stride(0), out.stride(0), out.stride(1),
        HEAD_D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(max_splits), HEADS=heads,
        HAS_SINKS=sinks is not None,
        PDL=pdl_reduce, num_warps=4 if block_d <= 128 else 8, **launch_options(pdl_reduce),
    )  # fmt: skip


__all__ = ["context_attention", "decode_attention", "new_token_mode", "NewTokenKV"]
