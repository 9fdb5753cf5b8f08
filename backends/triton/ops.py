"""Triton-backed custom ops. Each has a fake implementation so cached graphs still trace, export and compile."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.backends.triton.kernels.attention import context_attention, decode_attention
from autodeploy.backends.triton.kernels.rms_norm import fused_add_rms_norm, rms_norm
from autodeploy.backends.triton.kernels.rope_cache import cache_write, rope_and_cache_write


def _paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor,
                     page_table: Tensor, batch_info: Tensor, meta: list[Tensor], scale: float,
                     sliding_window: Optional[int], logit_softcap: Optional[float], sinks: Optional[Tensor]) -> Tensor:
    """Prefill/extend sequences go to the flash kernel, decodes to the split-K kernel over the partition table
    the metadata node derived (``meta = [decode_work, decode_split_start]``); counts are host ints."""
    n_prefill, n_prefill_tok, n_decode, max_q = (int(x) for x in batch_info.tolist())
    out = torch.empty((q.shape[0], q.shape[1], v_cache.shape[-1]), dtype=q.dtype, device=q.device)
    if n_prefill:
        context_attention(q[:n_prefill_tok], k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table,
                          out[:n_prefill_tok], num_seqs=n_prefill, max_q_len=max_q, scale=scale,
                          sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks)
    if n_decode:
        if len(meta) != 2:
            raise ValueError("triton cached attention expects meta = [decode_work, decode_split_start]")
        decode_attention(q, k_cache, v_cache, seq_lens_kv, page_table, out, scale=scale,
                         sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks,
                         cu_seqlens_q=cu_seqlens_q, partition=(meta[0], meta[1]))
    return out


@torch.library.custom_op("autodeploy::triton_cached_attention", mutates_args=("k_cache", "v_cache"))
def triton_cached_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor, slot_mapping: Tensor, batch_info: Tensor,
    meta: list[Tensor], scale: float, sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> Tensor:
    cache_write(k, v, k_cache, v_cache, slot_mapping)
    return _paged_attention(q, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, batch_info, meta, scale,
                            sliding_window, logit_softcap, sinks)


@triton_cached_attention.register_fake
def _fake_cached(q, k, v, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, slot_mapping, batch_info, meta,
                 scale, sliding_window=None, logit_softcap=None, sinks=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@torch.library.custom_op("autodeploy::triton_cached_attention_rope", mutates_args=("k_cache", "v_cache"))
def triton_cached_attention_rope(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor, slot_mapping: Tensor, batch_info: Tensor,
    meta: list[Tensor], scale: float, sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None, sinks: Optional[Tensor] = None,
) -> Tensor:
    """RoPE on q/k fused with the KV-cache write (one kernel), then paged attention on the rotated q."""
    q_rot = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return _paged_attention(q_rot, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, batch_info, meta,
                            scale, sliding_window, logit_softcap, sinks)


@triton_cached_attention_rope.register_fake
def _fake_rope(q, k, v, cos, sin, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, slot_mapping,
               batch_info, meta, scale, sliding_window=None, logit_softcap=None, sinks=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))


@torch.library.custom_op("autodeploy::triton_rms_norm", mutates_args=())
def triton_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm(x, weight, eps)


@triton_rms_norm.register_fake
def _fake_rms(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


@torch.library.custom_op("autodeploy::triton_fused_add_rms_norm", mutates_args=())
def triton_fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``r = x + residual; return rms_norm(r), r`` in one pass over the row."""
    return fused_add_rms_norm(x, residual, weight, eps)


@triton_fused_add_rms_norm.register_fake
def _fake_add_rms(x, residual, weight, eps):
    r = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype),
                    device=x.device)
    return torch.empty(r.shape, dtype=torch.promote_types(r.dtype, weight.dtype), device=x.device), r
