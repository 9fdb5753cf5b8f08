"""Mamba2 selective state-space scan (SSD) with an SSM state per sequence (Bamba, GraniteMoeHybrid).

Canonical: ``autodeploy::ssm_scan(x[B,S,H,P], dt[B,S,H], A[H], B[B,S,G,N], C[B,S,G,N]) -> y[B,S,H,P]`` (fp32),
with ``dt`` already discretised (softplus, bias, clamp: token-local, left in the graph) and the ``D`` skip left
outside. Per head ``h`` (group ``g = h // (H / G)``)::

    state_t = exp(dt_t[h] * A[h]) * state_{t-1} + dt_t[h] * x_t[h] (outer) B_t[g]      # [P, N]
    y_t[h]  = state_t @ C_t[g]                                                           # [P]

in fp32, from a zero state. Cached: ``autodeploy::cached_ssm_scan(x[1,T,H,P], dt, A, B, C, state![slots,H,P,N],
cu_seqlens_q, seq_lens_kv, state_slots)``: each packed sequence continues from its slot's state (zero at
position 0) and leaves its final state there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autodeploy.ops.mixers.base import STATE_STEP_TENSORS, MixerKind, define_scan_ops, register_mixer


CHUNK = 64  # tokens per block of the chunked form (bounds the [H, Q, Q] intra-chunk matrices)


def scan_with_state(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence: ``x[n,H,P]``, ``dt[n,H]``, ``B, C[n,G,N]`` from ``state[H,P,N]``; returns (y fp32, state).

    The chunked (SSD) form of the recurrence, exact in real arithmetic: within a block of Q tokens, token ``t``
    sees token ``s <= t`` through ``(C_t . B_s) * exp(cum_t - cum_s) * dt_s x_s`` (``cum``: the running sum of
    ``dt * A``), plus the block's entry state decayed by ``exp(cum_t)``; the state leaving the block is the entry
    state decayed over the block plus every token's decayed contribution. So a prefill costs n / Q steps, a
    decode token one."""
    heads, groups = x.shape[1], B.shape[1]
    if heads % groups:
        raise ValueError(f"ssm_scan: {heads} heads are not a multiple of {groups} groups")
    B = B.float().repeat_interleave(heads // groups, dim=1)  # [n, H, N]
    C = C.float().repeat_interleave(heads // groups, dim=1)
    dt = dt.float()
    dx = x.float() * dt[..., None]  # [n, H, P]
    log_decay = dt * A.float()  # [n, H], <= 0
    h = state.float()
    ys = []
    for a in range(0, x.shape[0], CHUNK):
        blk = slice(a, min(a + CHUNK, x.shape[0]))
        cum = torch.cumsum(log_decay[blk], dim=0)  # [q, H]
        q = cum.shape[0]
        diff = cum[:, None, :] - cum[None, :, :]  # [t, s, H]
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()[..., None]
        weight = torch.where(causal, torch.exp(torch.where(causal, diff, 0.0)), 0.0)  # [t, s, H]
        scores = torch.einsum("thn,shn->tsh", C[blk], B[blk]) * weight
        y = torch.einsum("tsh,shp->thp", scores, dx[blk])
        y = y + torch.einsum("thn,hpn->thp", C[blk], h) * torch.exp(cum)[..., None]
        ys.append(y)
        to_end = torch.exp(cum[-1][None, :] - cum)  # [q, H]
        h = h * torch.exp(cum[-1])[:, None, None] + torch.einsum("sh,shp,shn->hpn", to_end, dx[blk], B[blk])
    y = torch.cat(ys) if ys else x.new_zeros(x.shape, dtype=torch.float32)
    return y, h


_OPS = define_scan_ops(
    "ssm_scan", scan_with_state,
    lambda x, A, B: x.new_zeros((x.shape[2], x.shape[3], B.shape[3]), dtype=torch.float32), "[1, T, H, P]")
ssm_scan_reference, cached_ssm_scan_reference = _OPS.reference, _OPS.cached_reference


def _state_shape(inputs: dict) -> tuple[int, ...]:
    x, b = inputs["x"].meta["val"], inputs["B"].meta["val"]
    return (int(x.shape[2]), int(x.shape[3]), int(b.shape[3]))


def _standin(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, **_: object) -> Tensor:
    """Token-local: each token's own contribution (the scan from a zero state, one token long)."""
    heads, groups = x.shape[2], B.shape[2]
    bc = (B.float() * C.float()).sum(-1).repeat_interleave(heads // groups, dim=2)  # [1, T, H]
    return x.float() * (dt.float() * bc)[..., None]


SSM_SCAN = register_mixer(MixerKind(
    name="ssm_scan", canonical=torch.ops.autodeploy.ssm_scan.default,
    cached=torch.ops.autodeploy.cached_ssm_scan.default,
    canonical_inputs=("x", "dt", "A", "B", "C"),
    cached_inputs=("x", "dt", "A", "B", "C", "state", *STATE_STEP_TENSORS),
    state_shape=_state_shape, state_dtype=lambda dtype: torch.float32, standin=_standin,
))
