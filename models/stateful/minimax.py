"""MiniMax (MiniMax-Text-01) lightning attention: linear attention with a constant per-head decay.

HF's ``MiniMaxLightningAttention`` computes, per head ``h`` with ``q, k, v = act(qkv_proj(x))`` split per head::

    S_t = exp(-slope[h]) * S_{t-1} + k_t (outer) v_t        # [D, Dv], zero before the sequence
    o_t = q_t @ S_t

(its prefill in blocks with precomputed decay tables, its decode token by token), then ``out_proj(sigmoid(
output_gate(x)) * norm(o))``. That recurrence is the SSD scan of autodeploy/ops/mixers/ssm.py with ``x = v``,
``B = k``, ``C = q`` (one group per head), ``dt = 1`` and ``A = -slope``, so no new mixer kind is needed: the
state slot holds ``S`` transposed, ``[H, Dv, D]``, in fp32. The check accepts only modules whose decay tables are
the ones HF derives from ``slope_rate`` (the blocked prefill and the step decode then agree with the recurrence).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from autodeploy.models.stateful import missing_form, register_mixer_rewrite
from autodeploy.ops import mixers  # noqa: F401  (registers the canonical ops)

_ATTRS = ("qkv_proj", "out_proj", "output_gate", "norm", "act_fn", "slope_rate", "query_decay", "key_decay",
          "diagonal_decay", "num_attention_heads", "head_dim", "block_size")


def _decay_tables(slope: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's query/key/diagonal decay tables for ``slope[H, 1, 1]`` (what its blocked prefill multiplies by)."""
    r = torch.arange(1, block + 1, dtype=torch.float32)
    query = torch.exp(-slope * r[:, None])
    key = torch.exp(-slope * (block - r[:, None]))
    diff = (r[:, None] - r[None, :])[None, None]
    diag = torch.exp(torch.where(diff >= 0, -slope * diff, float("-inf")))
    return query, key, diag


def check(module: torch.nn.Module) -> Optional[str]:
    why = missing_form(module, _ATTRS)
    if why:
        return why
    heads, d, block = module.num_attention_heads, module.head_dim, module.block_size
    linears = {"qkv_proj": 3 * heads * d, "output_gate": heads * d}
    for name, features in linears.items():
        layer = getattr(module, name)
        if not isinstance(layer, torch.nn.Linear) or layer.out_features != features:
            return f"{name} is not a linear giving {features} features"
    if not isinstance(module.out_proj, torch.nn.Linear) or module.out_proj.in_features != heads * d:
        return f"out_proj is not a linear taking {heads * d} features"
    slope = module.slope_rate
    if not isinstance(slope, torch.Tensor) or tuple(slope.shape) != (heads, 1, 1):
        return f"slope_rate is not [{heads}, 1, 1]"
    if not bool(torch.isfinite(slope).all()) or not bool((slope >= 0).all()):
        return "slope_rate is not finite and non-negative (a decay above 1 is unverified)"
    if not isinstance(block, int) or block < 1:
        return f"block_size {block!r} is not a positive int"
    tol = 1e-5 if slope.dtype in (torch.float32, torch.float64) else 2e-2
    for name, want in zip(("query_decay", "key_decay", "diagonal_decay"), _decay_tables(slope.float().cpu(), block)):
        have = getattr(module, name)
        if not isinstance(have, torch.Tensor) or have.shape != want.shape or not torch.allclose(
                have.detach().float().cpu(), want, rtol=tol, atol=tol):
            return f"{name} is not the table HF derives from slope_rate (its blocked prefill would differ)"
    return None


def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
    """HF's layer returns ``(output, state)``; the decoder layer drops the state, so None stands in for it."""
    bsz, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, d = self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states)).reshape(bsz, seq_len, heads, 3 * d)
    q, k, v = torch.split(qkv, d, dim=3)
    dt = torch.ones(q.shape[:3], dtype=torch.float32, device=q.device)
    a = -self.slope_rate.float().reshape(heads)
    y = torch.ops.autodeploy.ssm_scan(v, dt, a, k, q)  # [B, S, H, Dv] fp32: o_t = q_t @ S_t
    y = self.norm(y.reshape(bsz, seq_len, heads * d).to(dtype))
    y = F.sigmoid(self.output_gate(hidden_states)) * y
    return self.out_proj(y), None


register_mixer_rewrite("MiniMaxLightningAttention", check, forward)
