"""Canonical attention op and the plain-torch math every attention backend is checked against.

Layout (SDPA's): q ``[B, Hq, S, D]``, k/v ``[B, Hkv, Skv, D]``, out ``[B, Hq, S, D]``. GQA/MQA are native:
``Hq % Hkv == 0`` and no repeat_kv is ever materialised. When ``Skv > S`` the queries are the last ``S``
positions (the usual "new tokens after a cached prefix" alignment).

The op's schema is generated from the variant registry (autodeploy/ops/variants/): after ``q, k, v, scale,
causal`` come the variants' parameters, by name (``sliding_window``, ``logit_softcap``, ``sinks``, ...).
Call it with keyword arguments for them; positions past ``causal`` are not a contract.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from autodeploy.ops import variants as _variants
from autodeploy.ops.variants import active_params, param_schema, params, variants


def visible_mask(q_pos: Tensor, kv_pos: Tensor, causal: bool, sliding_window: Optional[int] = None,
                 **variant_params: Any) -> Tensor:
    """Boolean ``[..., Sq, Skv]`` mask of keys each query may see: causality plus every active mask variant."""
    diff = q_pos.unsqueeze(-1) - kv_pos.unsqueeze(-2)
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    values = active_params({"sliding_window": sliding_window, **variant_params})
    for var in variants():
        if var.mask_mod is not None and var.param.name in values:
            allowed &= var.mask_mod(values[var.param.name], q_pos, kv_pos)
    return allowed


def attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float, q_pos: Tensor, kv_pos: Tensor,
           **variant_params: Any) -> Tensor:
    """Masked GQA attention in fp32, with every active score variant applied.

    q ``[N, Hq, Sq, D]``, k/v ``[N, Hkv, Skv, D]``, allowed ``[N, Sq, Skv]`` (broadcast over heads), q_pos
    ``[N, Sq]`` and kv_pos ``[N, Skv]`` absolute positions. Returns ``[N, Hq, Sq, Dv]`` in q's dtype. Rows with
    no visible key (and no sink) produce zeros.
    """
    n, hq, sq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    values = active_params(variant_params)
    q_pos, kv_pos = q_pos.expand(n, sq), kv_pos.expand(n, k.shape[2])
    qf = q.float().reshape(n, hkv, group, sq, d)
    scores = torch.einsum("nhgsd,nhtd->nhgst", qf, k.float()) * scale
    extra = []
    for var in variants():
        value = values.get(var.param.name)
        if value is None:
            continue
        if var.score_mod is not None:
            scores = var.score_mod(value, scores, q_pos, kv_pos)
        if var.extra_logit is not None:
            extra.append(var.extra_logit(value).float().reshape(1, hkv, group, 1, 1).expand(n, hkv, group, sq, 1))
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if extra:
        scores = torch.cat([scores, *extra], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    probs = torch.exp(scores - row_max)
    denom = probs.sum(dim=-1, keepdim=True)
    probs = probs / torch.where(denom > 0, denom, torch.ones_like(denom))
    if extra:
        probs = probs[..., : -len(extra)]
    out = torch.einsum("nhgst,nhtd->nhgsd", probs, v.float())
    return out.reshape(n, hq, sq, v.shape[-1]).to(q.dtype)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = True, *args: Any,
                        **variant_params: Any) -> Tensor:
    """Plain-torch semantics of the canonical op (variant parameters by name; positional ones follow the
    schema order)."""
    variant_params = dict(zip([p.name for p in params()], args), **variant_params)
    sq, skv = q.shape[2], k.shape[2]
    q_pos = torch.arange(skv - sq, skv, device=q.device)[None]
    kv_pos = torch.arange(skv, device=q.device)[None]
    allowed = visible_mask(q_pos, kv_pos, causal, **variant_params).expand(q.shape[0], sq, skv)
    return attend(q, k, v, allowed, scale, q_pos, kv_pos, **variant_params)


_variants.base.freeze()
_lib = torch.library.Library("autodeploy", "FRAGMENT")
_lib.define(f"attention(Tensor q, Tensor k, Tensor v, float scale, bool causal=True, {param_schema()}) -> Tensor")
def _attention_impl(q, k, v, scale, causal=True, *args, **kwargs):
    return attention_reference(q, k, v, scale, causal, *args, **kwargs)


_lib.impl("attention", _attention_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("autodeploy::attention")
def _attention_fake(q, k, v, scale, causal=True, *args, **kwargs):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


attention = torch.ops.autodeploy.attention.default


def attention_inputs(node: Any) -> dict[str, Any]:
    """A canonical-attention call's inputs by name (``q, k, v, scale, causal`` and every variant parameter;
    unset ones are their defaults)."""
    schema = torch.ops.autodeploy.attention.default._schema
    bound = dict(zip([a.name for a in schema.arguments], node.args), **node.kwargs)
    out = {}
    for a in schema.arguments:
        out[a.name] = bound.get(a.name, a.default_value if a.has_default_value() else None)
    return out
