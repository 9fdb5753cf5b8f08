"""Gated delta rule (linear attention with a delta-rule state update and a per-head decay; Qwen3-Next's
Gated DeltaNet) with a ``[Dk, Dv]`` state per value head and sequence.

Canonical: ``autodeploy::gated_delta_rule(q[B,S,Hk,Dk], k[B,S,Hk,Dk], v[B,S,Hv,Dv], g[B,S,Hv], beta[B,S,Hv],
scale) -> o[B,S,Hv,Dv]`` (fp32). ``g`` is the log decay (<= 0), ``beta`` the write strength; key head ``h // (Hv /
Hk)`` serves value head ``h``. Any normalisation of q and k (Qwen3-Next's L2 norm) is token-local and stays in
the graph. Per value head, from a zero state::

    S   = exp(g_t) * S_{t-1}                       # [Dk, Dv]
    S_t = S + k_t (outer) beta_t * (v_t - S^T k_t)   # delta rule: write only what S does not already predict
    o_t = scale * S_t^T q_t

in fp32. Cached: ``autodeploy::cached_gated_delta_rule(q[1,T,..], k, v, g, beta, state![slots,Hv,Dk,Dv],
cu_seqlens_q, seq_lens_kv, state_slots, scale)``: each packed sequence continues from its slot's state (zero at
position 0) and leaves its final state there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autodeploy.ops.mixers.base import STATE_STEP_TENSORS, MixerKind, register_mixer, step_rows

CHUNK = 64  # tokens per block of the chunked form (bounds the [H, Q, Q] intra-block matrices)


def _grouped(q: Tensor, k: Tensor, value_heads: int, dim: int = 1) -> tuple[Tensor, Tensor]:
    """q and k in fp32 with each key head repeated for the value heads it serves (heads along ``dim``)."""
    key_heads = k.shape[dim]
    if value_heads % key_heads:
        raise ValueError(f"gated_delta_rule: {value_heads} value heads are not a multiple of {key_heads} key heads")
    rep = value_heads // key_heads
    return q.float().repeat_interleave(rep, dim=dim), k.float().repeat_interleave(rep, dim=dim)


def delta_rule_with_state(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    """One sequence: ``q, k[n,Hk,Dk]``, ``v[n,Hv,Dv]``, ``g, beta[n,Hv]`` from ``state[Hv,Dk,Dv]``; returns
    (o fp32 ``[n,Hv,Dv]``, state).

    The chunked form, exact in real arithmetic: within a block of Q tokens with ``c_t`` the running sum of ``g``
    and entry state ``S0``, the written values ``u_t = beta_t (v_t - S'^T k_t)`` solve the unit lower-triangular
    system ``u_t + beta_t sum_{s<t} e^{c_t - c_s} (k_t . k_s) u_s = beta_t (v_t - e^{c_t} S0^T k_t)``; then
    ``o_t = scale (e^{c_t} S0^T q_t + sum_{s<=t} e^{c_t - c_s} (q_t . k_s) u_s)`` and the block leaves
    ``e^{c_Q} S0 + sum_s e^{c_Q - c_s} k_s u_s^T``. A prefill costs n / Q triangular solves, a decode token one."""
    heads = v.shape[1]
    q, k = _grouped(q, k, heads)
    q, k, v, g, beta = (t.float().transpose(0, 1) for t in (q * scale, k, v, g, beta))  # head-major
    s = state.float()
    outs = []
    for a in range(0, q.shape[1], CHUNK):
        blk = slice(a, min(a + CHUNK, q.shape[1]))
        qb, kb, vb, bb = q[:, blk], k[:, blk], v[:, blk], beta[:, blk, None]  # [H, n, D], [H, n, 1]
        c = torch.cumsum(g[:, blk], dim=1)  # [H, n]
        n = c.shape[1]
        lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        decay = torch.where(lower, torch.exp(torch.where(lower, c[:, :, None] - c[:, None, :], 0.0)), 0.0)
        strict = (kb @ kb.transpose(1, 2)) * decay * bb
        system = strict.masked_fill(lower.logical_not() | torch.eye(n, dtype=torch.bool, device=q.device), 0.0)
        system = system + torch.eye(n, dtype=system.dtype, device=q.device)
        rhs = bb * (vb - torch.exp(c)[..., None] * (kb @ s))
        u = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [H, n, Dv]
        outs.append(torch.exp(c)[..., None] * (qb @ s) + ((qb @ kb.transpose(1, 2)) * decay) @ u)
        s = torch.exp(c[:, -1])[:, None, None] * s + (kb * torch.exp(c[:, -1:] - c)[..., None]).transpose(1, 2) @ u
    o = torch.cat(outs, dim=1).transpose(0, 1) if outs else v.new_zeros(v.shape).transpose(0, 1)
    return o.contiguous(), s


def gated_delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float) -> Tensor:
    zero = v.new_zeros((v.shape[2], k.shape[3], v.shape[3]), dtype=torch.float32)
    return torch.stack([delta_rule_with_state(zero, q[b], k[b], v[b], g[b], beta[b], scale)[0]
                        for b in range(v.shape[0])])


@torch.library.custom_op("autodeploy::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float) -> Tensor:
    return gated_delta_rule_reference(q, k, v, g, beta, scale)


@gated_delta_rule.register_fake
def _gated_delta_rule_fake(q, k, v, g, beta, scale):
    return torch.empty(v.shape, dtype=torch.float32, device=v.device)


def decode_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                scale: float) -> tuple[Tensor, Tensor]:
    """One token of each of N sequences at once: ``q, k[N,Hk,Dk]``, ``v[N,Hv,Dv]``, ``g, beta[N,Hv]`` from
    ``state[N,Hv,Dk,Dv]``; returns (o fp32 ``[N,Hv,Dv]``, states), the recurrence as written above."""
    q, k = _grouped(q, k, v.shape[1])
    s = state.float() * torch.exp(g.float())[..., None, None]
    delta = beta.float()[..., None] * (v.float() - torch.einsum("nhk,nhkv->nhv", k, s))
    s = s + k[..., None] * delta[..., None, :]
    return torch.einsum("nhk,nhkv->nhv", q * scale, s), s


def cached_gated_delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                                      cu_seqlens_q: Tensor, seq_lens_kv: Tensor, state_slots: Tensor,
                                      scale: float) -> Tensor:
    """Sequences of one new token (decodes) go through one batched step; the others through the chunked form."""
    if v.shape[0] != 1:
        raise ValueError(f"cached_gated_delta_rule takes the flattened layout [1, T, H, D], got {tuple(v.shape)}")
    out = torch.zeros(v.shape[1:], dtype=torch.float32, device=v.device)
    singles = []
    for first, n, continues, slot in step_rows(cu_seqlens_q, seq_lens_kv, state_slots):
        if n == 1 and slot >= 0:
            singles.append((first, continues, slot))
            continue
        rows = slice(first, first + n)
        s0 = state[slot] if continues and slot >= 0 else state.new_zeros(state.shape[1:])
        o, s = delta_rule_with_state(s0, q[0, rows], k[0, rows], v[0, rows], g[0, rows], beta[0, rows], scale)
        out[rows] = o
        if slot >= 0:
            state[slot] = s.to(state.dtype)
    if singles:
        rows, continues, slots = (torch.tensor(c, device=v.device) for c in zip(*singles))
        s0 = torch.where(continues[:, None, None, None], state[slots], 0.0)  # position 0: a zero state
        o, s = decode_step(s0, q[0, rows], k[0, rows], v[0, rows], g[0, rows], beta[0, rows], scale)
        out[rows] = o
        state[slots] = s.to(state.dtype)
    return out.unsqueeze(0)


@torch.library.custom_op("autodeploy::cached_gated_delta_rule", mutates_args=("state",))
def cached_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                            cu_seqlens_q: Tensor, seq_lens_kv: Tensor, state_slots: Tensor, scale: float) -> Tensor:
    return cached_gated_delta_rule_reference(q, k, v, g, beta, state, cu_seqlens_q, seq_lens_kv, state_slots, scale)


@cached_gated_delta_rule.register_fake
def _cached_gated_delta_rule_fake(q, k, v, g, beta, state, cu_seqlens_q, seq_lens_kv, state_slots, scale):
    return torch.empty(v.shape, dtype=torch.float32, device=v.device)


def _state_shape(inputs: dict) -> tuple[int, ...]:
    """``[Hv, Dk, Dv]``: one key-by-value matrix per value head."""
    k, v = inputs["k"].meta["val"], inputs["v"].meta["val"]
    return (int(v.shape[2]), int(k.shape[3]), int(v.shape[3]))


def _standin(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float = 1.0, **_: object) -> Tensor:
    """Token-local: each token's own contribution (the rule from a zero state, one token long)."""
    qh, kh = _grouped(q, k, v.shape[2], dim=2)
    return (scale * (qh * kh).sum(-1) * beta.float())[..., None] * v.float()


GATED_DELTA_RULE = register_mixer(MixerKind(
    name="gated_delta_rule", canonical=torch.ops.autodeploy.gated_delta_rule.default,
    cached=torch.ops.autodeploy.cached_gated_delta_rule.default,
    canonical_inputs=("q", "k", "v", "g", "beta", "scale"),
    cached_inputs=("q", "k", "v", "g", "beta", "state", *STATE_STEP_TENSORS, "scale"),
    state_shape=_state_shape, state_dtype=lambda dtype: torch.float32, standin=_standin,
))
