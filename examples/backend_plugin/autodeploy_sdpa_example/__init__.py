"""``sdpa-example``: an out-of-tree autodeploy attention backend in one file.

Paged attention through ``torch.nn.functional.scaled_dot_product_attention``: for each sequence of the step,
gather its pages from the cache, build its causal (and sliding-window) mask, and call SDPA. It is registered
through the ``autodeploy.backends`` entry point (pyproject.toml), so ``compile(model, backend="sdpa-example")``
finds it without autodeploy knowing it exists.

What a backend brings (autodeploy/backends/base.py, docs/extending.md):
* ``capabilities``: the variant parameters it runs (``supports`` refuses layers needing others);
* its cached op, defined from the shared cached-op schema (``define_cached_attention``);
* its metadata fields (none: it reads the step inputs directly) and its CUDA-graph grade (none: the host loop
  below sizes work from the step's lengths, which a replayed graph could not change);
* its cache layout (the default paged K/V layout of docs/contracts.md is inherited unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from autodeploy.backends.base import AttentionBackend, CudaGraphSupport
from autodeploy.ops import define_cached_attention

__all__ = ["SdpaExampleBackend", "sdpa_cached_attention"]


def _write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Scatter the new tokens' K/V into their cache slots (``page * page_size + row``); slot -1 writes nothing."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def _gather(cache: Tensor, pages: Tensor, length: int) -> Tensor:
    """One sequence's first ``length`` cached rows as ``[1, Hkv, length, D]``."""
    rows = cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length]
    return rows.transpose(0, 1).unsqueeze(0)


def _cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                      seq_lens_kv: Tensor, page_table: Tensor, slot_mapping: Tensor, batch_info: Tensor,
                      meta: list[Tensor], scale: float, params: dict[str, Any]) -> Tensor:
    """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` (this step's new tokens) -> ``[T, Hq, Dv]``. ``params``: the variant
    parameters by name; ``supports`` lets only ``sliding_window`` through, so the others are None here."""
    _write_kv(k, v, k_cache, v_cache, slot_mapping)
    window = params.get("sliding_window")
    out = q.new_zeros((q.shape[0], q.shape[1], v_cache.shape[-1]))
    page_size = k_cache.shape[1]
    starts, kv_lens = cu_seqlens_q.tolist(), seq_lens_kv.tolist()
    for s, kv_len in enumerate(kv_lens):
        q_lo, q_hi = starts[s], starts[s + 1]
        if q_hi == q_lo or kv_len == 0:  # an empty (padding) sequence
            continue
        pages = page_table[s, : -(-kv_len // page_size)].long()
        keys, values = _gather(k_cache, pages, kv_len), _gather(v_cache, pages, kv_len)
        q_pos = torch.arange(kv_len - (q_hi - q_lo), kv_len, device=q.device)[:, None]
        kv_pos = torch.arange(kv_len, device=q.device)[None, :]
        visible = kv_pos <= q_pos  # causal; HF's window shows ``w`` keys including the token itself
        if window is not None and window > 0:
            visible &= q_pos - kv_pos < window
        qs = q[q_lo:q_hi].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        o = F.scaled_dot_product_attention(qs.float(), keys.float(), values.float(), attn_mask=visible,
                                           scale=scale, enable_gqa=True)  # softmax and sums in fp32
        out[q_lo:q_hi] = o[0].transpose(0, 1).to(out.dtype)
    return out


# The op gets the shared cached-attention signature from autodeploy's one schema (autodeploy/ops/cached.py):
# ``autodeploy::sdpa_example_cached_attention`` with a fake implementation, callable by name from the passes.
sdpa_cached_attention = define_cached_attention("sdpa_example_cached_attention", _cached_attention)


class SdpaExampleBackend(AttentionBackend):
    """Never chosen automatically (negative priority): ask for it with ``backend="sdpa-example"``."""

    name = "sdpa-example"
    devices = ("cpu", "cuda")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    metadata_fields = ()
    # Variant parameters it runs; ``AttentionBackend.supports`` refuses a layer needing any other (SDPA has no
    # logit softcap, sinks or ALiBi here), naming it.
    capabilities = frozenset({"sliding_window"})
    # KV-cache storage it reads: the model dtype only (``supports`` refuses kv_cache_dtype="fp8", naming it).
    kv_cache_dtypes = ("auto",)
    priority = -10
    cuda_graphs = CudaGraphSupport.NONE

    def cached_attention_op(self):
        return sdpa_cached_attention
