"""The functional cached attention that whole-graph engines (ONNX Runtime, TensorRT) run.

The cached graph's attention op writes this step's K/V into the paged cache, then attends. An ONNX graph has no
in-place update of a graph input (ONNX Runtime documents no input/output aliasing; a ScatterND on a graph input
copies the whole cache, per layer, every step). So the engine form reads the cache as it was before the step,
attends over those pages *plus* this step's K/V (scattered into the gathered per-sequence copy), and leaves the
cache write to the host: the engine outputs each layer's new K/V rows, and the runner writes them into the
paged cache at ``slot_mapping`` (one ``index_copy_`` per layer). The torch implementation below mirrors the
ONNX translation op for op, so the rewritten graph can be checked in torch before it is exported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.ops.attention import attend, visible_mask


def gather_sequences(cache: Tensor, page_table: Tensor, new: Tensor, seq_idx: Tensor, q_abs_pos: Tensor) -> Tensor:
    """``[B, L, H, D]`` per-sequence keys (or values): the sequences' pages, with this step's rows put in place."""
    b, p = page_table.shape
    g = cache[page_table.long()].reshape(b, p * cache.shape[1], cache.shape[2], cache.shape[3]).clone()
    g[seq_idx.long(), q_abs_pos.long()] = new.to(g.dtype)
    return g


@torch.library.custom_op("autodeploy::engine_paged_attention", mutates_args=())
def engine_paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
    cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor,
    seq_idx: Tensor, tok_offset: Tensor, q_abs_pos: Tensor,
    scale: float, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
) -> Tensor:
    """Attention of flattened queries ``[T, Hq, D]`` over the pages before this step plus the step's own K/V.
    Queries are padded per sequence to ``[B, max_q]``; the result is gathered back to the flattened rows."""
    n_seq = page_table.shape[0]
    keys = gather_sequences(k_cache, page_table, k, seq_idx, q_abs_pos).transpose(1, 2)  # [B, Hkv, L, D]
    values = gather_sequences(v_cache, page_table, v, seq_idx, q_abs_pos).transpose(1, 2)
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    max_q = int(q_lens.max())
    q_pad = q.new_zeros((n_seq, max_q, q.shape[1], q.shape[2]))
    q_pad[seq_idx.long(), tok_offset.long()] = q
    q_pos = (seq_lens_kv.long() - q_lens)[:, None] + torch.arange(max_q, device=q.device)  # [B, max_q]
    kv_pos = torch.arange(keys.shape[2], device=q.device)[None]  # [1, L]
    allowed = visible_mask(q_pos, kv_pos, True, sliding_window=sliding_window)  # [B, max_q, L]
    out = attend(q_pad.transpose(1, 2), keys, values, allowed, scale, q_pos, kv_pos,
                 logit_softcap=logit_softcap)  # [B, Hq, max_q, Dv]
    return out.transpose(1, 2)[seq_idx.long(), tok_offset.long()]


@engine_paged_attention.register_fake
def _fake(q, k, v, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, seq_idx, tok_offset, q_abs_pos,
          scale, sliding_window=None, logit_softcap=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[-1]))
