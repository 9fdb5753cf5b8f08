"""ALiBi (Bloom, MPT, Falcon with ``alibi=True``): a per-head linear bias ``slope[h] * (j - i)`` on the scaled
scores (key position ``j``, query position ``i``). HF writes it as ``slope * j``; a per-row constant does not
change a softmax, so both are the same attention. The slopes are read off the bias the model builds, by
probing its subgraph (passes/match_attention.py), whatever the form that builds it."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.ops.variants.base import AttentionVariant, Param, register_variant


def _score_mod(slopes: Tensor, scores: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    """scores ``[N, Hkv, G, Sq, Skv]``; q_pos ``[N, Sq]``; kv_pos ``[N, Skv]``."""
    _, hkv, g = scores.shape[:3]
    dist = (kv_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).to(torch.float32)  # [N, Sq, Skv]
    return scores + slopes.float().reshape(1, hkv, g, 1, 1) * dist[:, None, None]


def _bias_form(bias: Tensor, allowed: Tensor, num_heads: int) -> Optional[Tensor]:
    """Per-head slopes if ``bias[h, i, j] = slope[h] * (j - i) + c[h, i]`` on every visible entry."""
    hb, sq, skv = bias.shape
    if hb not in (1, num_heads):
        return None
    bias = bias.double()
    i = (skv - sq) + torch.arange(sq, dtype=torch.float64)[:, None]
    j = torch.arange(skv, dtype=torch.float64)[None, :]
    row = sq - 1
    cols = allowed[row].nonzero().flatten()
    if cols.numel() < 2:
        return None
    lo, hi = int(cols[0]), int(cols[-1])
    slopes = (bias[:, row, hi] - bias[:, row, lo]) / (hi - lo)  # [Hb]
    resid = bias - slopes[:, None, None] * (j - i)
    big, small = torch.finfo(torch.float64).max, torch.finfo(torch.float64).min
    row_max = resid.masked_fill(~allowed, small).amax(-1)
    row_min = resid.masked_fill(~allowed, big).amin(-1)
    tol = 1e-4 * (1.0 + float(bias.masked_fill(~allowed, 0).abs().max()))
    if not bool(((row_max - row_min)[allowed.any(-1).expand(hb, sq)] <= tol).all()):
        return None
    if not bool((slopes != 0).any()):
        return None
    return slopes.float().expand(num_heads).contiguous()


register_variant(AttentionVariant(
    name="alibi", order=30,
    params=(Param("alibi_slopes", "Tensor?", "per-query-head ALiBi slope [Hq], fp32 (None: off)"),),
    doc=__doc__, score_mod=_score_mod, bias_form=_bias_form,
))
