"""Qwen3-Next Gated DeltaNet: ``in_proj_qkvz`` / ``in_proj_ba`` (grouped per key head) -> q, k, v, z, b, a;
silu(causal depthwise conv over q, k, v); L2-normalised q and k; the gated delta rule with ``beta = sigmoid(b)``
and ``g = -exp(A_log) * softplus(a + dt_bias)``; a per-head gated RMSNorm (``rmsnorm(o) * w * silu(z)``);
out_proj. The conv keeps a causal_conv1d state and the rule a gated_delta_rule state per sequence.

Verified form: HF's ``Qwen3NextGatedDeltaNet`` with a silu activation, a causal depthwise conv over q, k, v and
HF's own ``Qwen3NextRMSNormGated`` (a fused norm from another library is refused by name, not assumed equal)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from autodeploy.models.stateful import missing_form, register_mixer_rewrite
from autodeploy.ops import mixers  # noqa: F401  (registers the canonical ops)

_ATTRS = ("in_proj_qkvz", "in_proj_ba", "conv1d", "dt_bias", "A_log", "norm", "out_proj", "num_k_heads",
          "num_v_heads", "head_k_dim", "head_v_dim", "key_dim", "value_dim", "conv_dim", "activation")
L2NORM_EPS = 1e-6  # HF's (and FLA's) l2norm epsilon on q and k


def check(module: torch.nn.Module) -> Optional[str]:
    why = missing_form(module, _ATTRS, silu=True)
    if why:
        return why
    hk, hv, dk, dv = module.num_k_heads, module.num_v_heads, module.head_k_dim, module.head_v_dim
    if hv % hk:
        return f"{hv} value heads are not a multiple of {hk} key heads"
    if module.key_dim != hk * dk or module.value_dim != hv * dv or module.conv_dim != 2 * module.key_dim + hv * dv:
        return "key_dim / value_dim / conv_dim do not match the head counts"
    conv = module.conv1d
    k = conv.kernel_size[0]
    if not (isinstance(conv, torch.nn.Conv1d) and conv.groups == conv.in_channels == conv.out_channels
            == module.conv_dim and conv.padding == (k - 1,) and conv.stride == (1,) and conv.dilation == (1,)):
        return "conv1d is not a causal depthwise conv over q, k, v"
    if module.in_proj_qkvz.out_features != 2 * module.key_dim + 2 * module.value_dim:
        return f"in_proj_qkvz gives {module.in_proj_qkvz.out_features} features, not q + k + v + z"
    if module.in_proj_ba.out_features != 2 * hv:
        return f"in_proj_ba gives {module.in_proj_ba.out_features} features, not 2 x {hv} value heads"
    if tuple(module.dt_bias.shape) != (hv,) or tuple(module.A_log.shape) != (hv,):
        return "dt_bias / A_log are not one value per value head"
    norm = module.norm
    if type(norm).__name__ != "Qwen3NextRMSNormGated" or getattr(norm, "activation", "silu") not in ("silu", "swish"):
        return f"norm is {type(norm).__name__} (verified: Qwen3NextRMSNormGated with silu)"
    if tuple(norm.weight.shape) != (dv,) or not hasattr(norm, "variance_epsilon"):
        return "norm is not a per-head gated RMSNorm"
    return None


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    bsz, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    hk, hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
    per_k = hv // hk  # value heads per key head; the projections are laid out per key head
    qkvz = self.in_proj_qkvz(hidden_states).view(bsz, seq_len, hk, 2 * dk + 2 * per_k * dv)
    q, k, v, z = qkvz.split([dk, dk, per_k * dv, per_k * dv], dim=-1)
    b, a = self.in_proj_ba(hidden_states).view(bsz, seq_len, hk, 2 * per_k).split([per_k, per_k], dim=-1)
    qkv = torch.cat([t.reshape(bsz, seq_len, -1) for t in (q, k, v)], dim=-1)
    qkv = torch.ops.autodeploy.causal_conv1d(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
    q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
    q = _l2norm(q.reshape(bsz, seq_len, hk, dk))
    k = _l2norm(k.reshape(bsz, seq_len, hk, dk))
    v = v.reshape(bsz, seq_len, hv, dv)
    beta = b.reshape(bsz, seq_len, hv).sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.reshape(bsz, seq_len, hv).float() + self.dt_bias)
    o = torch.ops.autodeploy.gated_delta_rule(q, k, v, g, beta, dk ** -0.5).to(dtype)
    # HF's Qwen3NextRMSNormGated per value head: normalise in fp32, weight in the model dtype, gate by silu(z)
    x = o.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
    x = self.norm.weight * x.to(dtype)
    x = (x * F.silu(z.reshape(bsz, seq_len, hv, dv).float())).to(dtype)
    return self.out_proj(x.reshape(bsz, seq_len, -1))


register_mixer_rewrite("Qwen3NextGatedDeltaNet", check, forward)
