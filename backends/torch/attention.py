"""Pure-PyTorch paged cached attention: the reference every other backend is checked against.

Writes the new tokens' K/V into the paged cache, then attends over the cache. Decode sequences (one query
each) run as one batched gather; prefill/extend sequences run padded to the step's longest chunk. The
host-known counts come from ``batch_info`` (a CPU tensor), so nothing here syncs on the device.

With an FP8 KV cache (``k_scale``/``v_scale`` given) the new rows are quantized on write and the gathered pages
dequantized before attention (autodeploy/ops/kv_quant.py, the reference of the Triton kernels).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from autodeploy.ops.attention import attend, visible_mask
from autodeploy.ops.cached import KV_SCALE_CACHES, define_cached_attention
from autodeploy.ops.kv_quant import dequantize_kv, quantize_kv

# Order of the derived metadata fields this backend reads (docs/contracts.md).
TORCH_METADATA_FIELDS = ("seq_idx", "tok_offset", "q_abs_pos")


def _scatter(cache: Tensor, slot_mapping: Tensor, rows: Tensor) -> None:
    """``cache``'s flat slots ``slot_mapping`` := ``rows`` (float8 through a byte view: no fp8 index_copy)."""
    flat = cache.view(-1, *cache.shape[2:])
    if cache.element_size() == 1:
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    flat.index_copy_(0, slot_mapping, rows)


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
             k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> None:
    """Scatter each new token's K/V into its cache slot (page * page_size + row); with scale caches, the rows
    are quantized first and their scales written beside them."""
    if k_scale is None:
        _scatter(k_cache, slot_mapping, k.to(k_cache.dtype))
        _scatter(v_cache, slot_mapping, v.to(v_cache.dtype))
        return
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        xq, sx = quantize_kv(x)
        _scatter(cache, slot_mapping, xq)
        _scatter(scales, slot_mapping, sx)


def _gather_pages(cache: Tensor, page_table: Tensor, scales: Optional[Tensor] = None,
                  dtype: Optional[torch.dtype] = None) -> Tensor:
    """``[B, P]`` pages -> ``[B, Hkv, P * page_size, D]`` contiguous keys/values (dequantized to ``dtype``
    when ``scales`` are given)."""
    b, p = page_table.shape
    g = cache[page_table.long()]  # [B, P, page, Hkv, D]
    if scales is not None:
        g = dequantize_kv(g, scales[page_table.long()], dtype)
    return g.reshape(b, p * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor,
    batch_info: Tensor, seq_idx: Tensor, tok_offset: Tensor, q_abs_pos: Tensor, scale: float,
    params: dict[str, Any], k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
) -> Tensor:
    """Attention of flattened queries ``[T, Hq, D]`` over the paged cache (already holding the new tokens).
    ``params``: the variant parameters by name; every registered variant runs through its reference hooks.
    ``k_scale``/``v_scale``: the scales of an FP8 cache (pages are dequantized to q's dtype)."""
    n_prefill, n_prefill_tok, n_decode, max_q = (int(x) for x in batch_info.tolist())
    out = q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))
    if n_decode:
        rows = slice(n_prefill, n_prefill + n_decode)
        k = _gather_pages(k_cache, page_table[rows], k_scale, q.dtype)
        v = _gather_pages(v_cache, page_table[rows], v_scale, q.dtype)
        kv_pos = torch.arange(k.shape[2], device=q.device)[None]
        q_pos = q_abs_pos[n_prefill_tok:].long()[:, None]  # [Bd, 1]
        allowed = visible_mask(q_pos, kv_pos, True, **params)  # [Bd, 1, L]
        allowed &= (kv_pos < seq_lens_kv[rows, None])[:, None, :]
        qd = q[n_prefill_tok:].unsqueeze(2)  # [Bd, Hq, 1, D]
        out[n_prefill_tok:] = attend(qd, k, v, allowed, scale, q_pos, kv_pos, **params).squeeze(2)
    if n_prefill:
        rows = slice(0, n_prefill)
        k = _gather_pages(k_cache, page_table[rows], k_scale, q.dtype)
        v = _gather_pages(v_cache, page_table[rows], v_scale, q.dtype)
        s_idx, t_off = seq_idx[:n_prefill_tok].long(), tok_offset[:n_prefill_tok].long()
        q_pad = q.new_zeros((n_prefill, max_q, q.shape[1], q.shape[2]))
        q_pad[s_idx, t_off] = q[:n_prefill_tok]
        q_lens = (cu_seqlens_q[1 : n_prefill + 1] - cu_seqlens_q[:n_prefill]).long()
        kv_lens = seq_lens_kv[:n_prefill].long()
        ar = torch.arange(max_q, device=q.device)
        q_pos = (kv_lens - q_lens)[:, None] + ar  # [Bp, max_q]
        kv_pos = torch.arange(k.shape[2], device=q.device)[None]
        allowed = visible_mask(q_pos, kv_pos, True, **params)
        allowed &= (kv_pos[:, None, :] < kv_lens[:, None, None]) & (ar[None, :, None] < q_lens[:, None, None])
        o = attend(q_pad.transpose(1, 2), k, v, allowed, scale, q_pos, kv_pos, **params)  # [Bp, Hq, max_q, D]
        out[:n_prefill_tok] = o.transpose(1, 2)[s_idx, t_off]
    return out


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                      seq_lens_kv: Tensor, page_table: Tensor, slot_mapping: Tensor, batch_info: Tensor,
                      meta: list[Tensor], scale: float, params: dict[str, Any], k_scale: Optional[Tensor] = None,
                      v_scale: Optional[Tensor] = None) -> Tensor:
    if (k_scale is None) != (v_scale is None):
        raise ValueError("an FP8 KV cache needs both k_scale and v_scale")
    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    seq_idx, tok_offset, q_abs_pos = meta
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, batch_info,
                           seq_idx, tok_offset, q_abs_pos, scale, params, k_scale, v_scale)


# The op's signature is the shared cached-attention schema (autodeploy/ops/cached.py), with the FP8 KV scales.
torch_cached_attention = define_cached_attention("torch_cached_attention", _cached_attention,
                                                 optional_caches=KV_SCALE_CACHES)
