"""Causal depthwise conv1d with a conv state (LFM2's short conv; Mamba/Mamba2's conv on x, B, C).

Canonical: ``autodeploy::causal_conv1d(x[B,S,C], weight[C,K], bias[C]?, activation) -> [B,S,C]``:
``y[t, c] = act(bias[c] + sum_k weight[c, k] * x[t - (K-1) + k, c])`` with zeros before the sequence start;
``activation`` is ``""`` (none) or ``"silu"``.
Cached: ``autodeploy::cached_causal_conv1d(x[1,T,C], weight, bias?, state![slots, K-1, C], cu_seqlens_q,
seq_lens_kv, state_slots, activation)``: each packed sequence continues from the last K-1 inputs kept in its
slot (zeros at position 0) and leaves its own last K-1 inputs there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from autodeploy.ops.mixers.base import STATE_STEP_TENSORS, MixerKind, register_mixer, step_rows

ACTIVATIONS = {"": lambda x: x, "silu": F.silu}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unknown activation {activation!r} (known: {sorted(ACTIVATIONS)})")


def conv_with_history(history: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    """``[n, C]`` outputs of the new tokens ``x[n, C]`` after ``history[K-1, C]`` earlier inputs."""
    seq = torch.cat([history.to(x.dtype), x], dim=0).transpose(0, 1).unsqueeze(0)  # [1, C, K-1+n]
    y = F.conv1d(seq.to(weight.dtype), weight.unsqueeze(1), bias, groups=weight.shape[0])  # [1, C, n]
    return ACTIVATIONS[activation](y[0].transpose(0, 1)).to(x.dtype)


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str = "") -> Tensor:
    _check_activation(activation)
    zeros = x.new_zeros(weight.shape[1] - 1, x.shape[-1])
    return torch.stack([conv_with_history(zeros, row, weight, bias, activation) for row in x])


@torch.library.custom_op("autodeploy::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "") -> Tensor:
    return causal_conv1d_reference(x, weight, bias, activation)


@causal_conv1d.register_fake
def _causal_conv1d_fake(x, weight, bias=None, activation=""):
    return torch.empty_like(x)


def cached_causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor,
                                   cu_seqlens_q: Tensor, seq_lens_kv: Tensor, state_slots: Tensor,
                                   activation: str = "") -> Tensor:
    _check_activation(activation)
    if x.shape[0] != 1:
        raise ValueError(f"cached_causal_conv1d takes the flattened layout [1, T, C], got {tuple(x.shape)}")
    xs = x[0]
    out = torch.zeros_like(xs)
    keep = weight.shape[1] - 1
    for first, n, continues, slot in step_rows(cu_seqlens_q, seq_lens_kv, state_slots):
        new = xs[first:first + n]
        history = state[slot] if continues and slot >= 0 else state.new_zeros(keep, xs.shape[-1])
        out[first:first + n] = conv_with_history(history, new, weight, bias, activation)
        if slot >= 0 and keep:
            state[slot] = torch.cat([history.to(state.dtype), new.to(state.dtype)], dim=0)[-keep:]
    return out.unsqueeze(0)


@torch.library.custom_op("autodeploy::cached_causal_conv1d", mutates_args=("state",))
def cached_causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor, cu_seqlens_q: Tensor,
                         seq_lens_kv: Tensor, state_slots: Tensor, activation: str = "") -> Tensor:
    return cached_causal_conv1d_reference(x, weight, bias, state, cu_seqlens_q, seq_lens_kv, state_slots,
                                          activation)


@cached_causal_conv1d.register_fake
def _cached_causal_conv1d_fake(x, weight, bias, state, cu_seqlens_q, seq_lens_kv, state_slots, activation=""):
    return torch.empty_like(x)


def _state_shape(inputs: dict) -> tuple[int, ...]:
    """``[K-1, C]``: the last K-1 inputs of the sequence (time-major, as the reference reads them)."""
    w = inputs["weight"].meta["val"]
    return (int(w.shape[1]) - 1, int(w.shape[0]))


def _standin(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "", **_: object) -> Tensor:
    """Token-local: each token's own input scaled by the last tap (what the conv does with no history)."""
    y = x * weight[:, -1].to(x.dtype)
    return ACTIVATIONS[activation](y + bias.to(x.dtype) if bias is not None else y)


CAUSAL_CONV1D = register_mixer(MixerKind(
    name="causal_conv1d", canonical=torch.ops.autodeploy.causal_conv1d.default,
    cached=torch.ops.autodeploy.cached_causal_conv1d.default,
    canonical_inputs=("x", "weight", "bias", "activation"),
    cached_inputs=("x", "weight", "bias", "state", *STATE_STEP_TENSORS, "activation"),
    state_shape=_state_shape, state_dtype=lambda dtype: dtype, standin=_standin,
    defaults=(("bias", None), ("activation", "")),
))
