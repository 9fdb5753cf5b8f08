"""Mamba-1 selective scan with an SSM state per sequence (Jamba).

Canonical: ``autodeploy::selective_scan(x[B,S,D], dt[B,S,D], A[D,N], B[B,S,N], C[B,S,N]) -> y[B,S,D]`` (fp32),
with ``dt`` already discretised (``softplus(dt_proj(.))``: token-local, left in the graph) and the ``D`` skip and
the gate left outside. Unlike Mamba2's per-head scalar decay (``ssm_scan``), ``A`` has one rate per channel and
state dimension, so every channel ``d`` keeps its own ``[N]`` state::

    state_t[d, :] = exp(dt_t[d] * A[d, :]) * state_{t-1}[d, :] + dt_t[d] * x_t[d] * B_t      # [N]
    y_t[d]        = state_t[d, :] . C_t                                                       # scalar

in fp32, from a zero state. Cached: ``autodeploy::cached_selective_scan(x[1,T,D], dt, A, B, C,
state![slots,D,N], cu_seqlens_q, seq_lens_kv, state_slots)``: each packed sequence continues from its slot's
state (zero at position 0) and leaves its final state there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from autodeploy.ops.mixers.base import STATE_STEP_TENSORS, MixerKind, define_scan_ops, register_mixer

# Tokens whose [n, D, N] decay and input terms are materialised at once: bounds a long prefill's memory.
BLOCK = 256


def scan_with_state(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One sequence: ``x, dt[n,D]``, ``B, C[n,N]`` from ``state[D,N]``; returns (y fp32 ``[n,D]``, state fp32).

    The recurrence token by token, in HF's order of operations (decay and input terms of a block at once, then
    the sequential update): a channel's state has ``N`` different decay rates, so the block-matrix form of the
    Mamba2 scan would need ``[Q, Q, D, N]`` weights per block."""
    if x.shape[-1] != A.shape[0] or B.shape[-1] != A.shape[1]:
        raise ValueError(f"selective_scan: x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} do not agree "
                         "(x[..., D], A[D, N], B[..., N])")
    A, h = A.float(), state.float()
    ys = []
    for a in range(0, x.shape[0], BLOCK):
        blk = slice(a, min(a + BLOCK, x.shape[0]))
        dt_b = dt[blk].float()
        decay = torch.exp(dt_b[:, :, None] * A)  # [q, D, N]
        inputs = (dt_b * x[blk].float())[:, :, None] * B[blk].float()[:, None, :]  # [q, D, N]
        c = C[blk].float()
        for t in range(decay.shape[0]):
            h = decay[t] * h + inputs[t]
            ys.append(h @ c[t])
    y = torch.stack(ys) if ys else x.new_zeros(x.shape, dtype=torch.float32)
    return y, h


_OPS = define_scan_ops("selective_scan", scan_with_state,
                       lambda x, A, B: x.new_zeros(tuple(A.shape), dtype=torch.float32), "[1, T, D]")
selective_scan_reference, cached_selective_scan_reference = _OPS.reference, _OPS.cached_reference


def _state_shape(inputs: dict) -> tuple[int, ...]:
    """``[D, N]``: A's shape (one decay rate per channel and state dimension)."""
    a = inputs["A"].meta["val"]
    return (int(a.shape[0]), int(a.shape[1]))


def _standin(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, **_: object) -> Tensor:
    """Token-local: each token's own contribution (the scan from a zero state, one token long)."""
    bc = (B.float() * C.float()).sum(-1, keepdim=True)  # [1, T, 1]
    return x.float() * dt.float() * bc


SELECTIVE_SCAN = register_mixer(MixerKind(
    name="selective_scan", canonical=torch.ops.autodeploy.selective_scan.default,
    cached=torch.ops.autodeploy.cached_selective_scan.default,
    canonical_inputs=("x", "dt", "A", "B", "C"),
    cached_inputs=("x", "dt", "A", "B", "C", "state", *STATE_STEP_TENSORS),
    state_shape=_state_shape, state_dtype=lambda dtype: torch.float32, standin=_standin,
))
