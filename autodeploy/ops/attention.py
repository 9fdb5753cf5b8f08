"""Canonical attention op and the plain-torch math every attention backend is checked against.

Layout (SDPA's): q ``[B, Hq, S, D]``, k/v ``[B, Hkv, Skv, D]``, out ``[B, Hq, S, D]``. GQA/MQA are native:
``Hq % Hkv == 0`` and no repeat_kv is ever materialised. When ``Skv > S`` the queries are the last ``S``
positions (the usual "new tokens after a cached prefix" alignment).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def visible_mask(q_pos: Tensor, kv_pos: Tensor, causal: bool, sliding_window: Optional[int]) -> Tensor:
    """Boolean ``[..., Sq, Skv]`` mask of keys each query may see (HF window convention: ``i - j < w``)."""
    diff = q_pos.unsqueeze(-1) - kv_pos.unsqueeze(-2)
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if sliding_window is not None and sliding_window > 0:
        allowed &= diff < sliding_window
    return allowed


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor,
    scale: float,
    logit_softcap: Optional[float],
    sinks: Optional[Tensor],
) -> Tensor:
    """Masked GQA attention in fp32.

    q ``[N, Hq, Sq, D]``, k/v ``[N, Hkv, Skv, D]``, allowed ``[N, Sq, Skv]`` (broadcast over heads).
    Returns ``[N, Hq, Sq, Dv]`` in q's dtype. Rows with no visible key produce zeros.
    """
    n, hq, sq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qf = q.float().reshape(n, hkv, group, sq, d)
    scores = torch.einsum("nhgsd,nhtd->nhgst", qf, k.float()) * scale
    if logit_softcap is not None and logit_softcap > 0:
        scores = torch.tanh(scores / logit_softcap) * logit_softcap
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, hkv, group, 1, 1).expand(n, hkv, group, sq, 1)
        scores = torch.cat([scores, sink], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("nhgst,nhtd->nhgsd", probs, v.float())
    return out.reshape(n, hq, sq, v.shape[-1]).to(q.dtype)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Plain-torch semantics of :func:`attention`."""
    sq, skv = q.shape[2], k.shape[2]
    q_pos = torch.arange(skv - sq, skv, device=q.device)
    kv_pos = torch.arange(skv, device=q.device)
    allowed = visible_mask(q_pos, kv_pos, causal, sliding_window).expand(q.shape[0], sq, skv)
    return attend(q, k, v, allowed, scale, logit_softcap, sinks)


@torch.library.custom_op("autodeploy::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
) -> Tensor:
    """Canonical attention: what every matched attention pattern becomes before cache insertion."""
    return attention_reference(q, k, v, scale, causal, sliding_window, logit_softcap, sinks)


@attention.register_fake
def _attention_fake(q, k, v, scale, causal=True, sliding_window=None, logit_softcap=None, sinks=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
