"""Pure-PyTorch paged cached attention: the reference every other backend is checked against.

Writes the new tokens' K/V into the paged cache, then attends over the cache. Decode sequences (one query
each) run as one batched gather; prefill/extend sequences run padded to the step's longest chunk. The
host-known counts come from ``batch_info`` (a CPU tensor), so nothing here syncs on the device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from autodeploy.ops.attention import attend, visible_mask
from autodeploy.ops.cached import define_cached_attention

# Order of the derived metadata fields this backend reads (docs/contracts.md).
TORCH_METADATA_FIELDS = ("seq_idx", "tok_offset", "q_abs_pos")


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter each new token's K/V into its cache slot (page * page_size + row)."""
    hkv, d, dv = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, dv).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_pages(cache: Tensor, page_table: Tensor) -> Tensor:
    """``[B, P]`` pages -> ``[B, Hkv, P * page_size, D]`` contiguous keys/values."""
    b, p = page_table.shape
    g = cache[page_table.long()]  # [B, P, page, Hkv, D]
    return g.reshape(b, p * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor,
    batch_info: Tensor, seq_idx: Tensor, tok_offset: Tensor, q_abs_pos: Tensor, scale: float,
    params: dict[str, Any],
) -> Tensor:
    """Attention of flattened queries ``[T, Hq, D]`` over the paged cache (already holding the new tokens).
    ``params``: the variant parameters by name; every registered variant runs through its reference hooks."""
    n_prefill, n_prefill_tok, n_decode, max_q = (int(x) for x in batch_info.tolist())
    out = q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))
    if n_decode:
        rows = slice(n_prefill, n_prefill + n_decode)
        k = _gather_pages(k_cache, page_table[rows])
        v = _gather_pages(v_cache, page_table[rows])
        kv_pos = torch.arange(k.shape[2], device=q.device)[None]
        q_pos = q_abs_pos[n_prefill_tok:].long()[:, None]  # [Bd, 1]
        allowed = visible_mask(q_pos, kv_pos, True, **params)  # [Bd, 1, L]
        allowed &= (kv_pos < seq_lens_kv[rows, None])[:, None, :]
        qd = q[n_prefill_tok:].unsqueeze(2)  # [Bd, Hq, 1, D]
        out[n_prefill_tok:] = attend(qd, k, v, allowed, scale, q_pos, kv_pos, **params).squeeze(2)
    if n_prefill:
        rows = slice(0, n_prefill)
        k = _gather_pages(k_cache, page_table[rows])
        v = _gather_pages(v_cache, page_table[rows])
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
                      meta: list[Tensor], scale: float, params: dict[str, Any]) -> Tensor:
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    seq_idx, tok_offset, q_abs_pos = meta
    return paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, batch_info,
                           seq_idx, tok_offset, q_abs_pos, scale, params)


# The op's signature is the shared cached-attention schema (autodeploy/ops/cached.py).
torch_cached_attention = define_cached_attention("torch_cached_attention", _cached_attention)
