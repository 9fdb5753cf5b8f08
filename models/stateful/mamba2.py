"""Mamba2 mixers (Bamba, GraniteMoeHybrid, Zamba2, Falcon-H1): in_proj -> (gate, xBC, dt); silu(causal conv(xBC));
the SSD scan with ``dt = clamp(softplus(dt + dt_bias))``, ``A = -exp(A_log)`` and the ``D`` skip; gated RMSNorm;
out_proj. Falcon-H1 adds its muP multipliers (``ssm_in_multiplier`` on the input, ``mup_vector`` on the
projection) and, without ``mamba_rms_norm``, gates by ``silu(gate)`` alone."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from autodeploy.models.stateful import missing_form, register_mixer_rewrite
from autodeploy.ops import mixers  # noqa: F401  (registers the canonical ops)

_ATTRS = ("in_proj", "conv1d", "dt_bias", "A_log", "D", "norm", "out_proj", "num_heads", "head_dim", "n_groups",
          "ssm_state_size", "intermediate_size", "conv_dim", "time_step_limit", "activation")


def check(module: torch.nn.Module) -> Optional[str]:
    why = missing_form(module, _ATTRS, silu=True)
    if why:
        return why
    conv = module.conv1d
    k = conv.kernel_size[0]
    if not (conv.groups == module.conv_dim == conv.in_channels and conv.padding == (k - 1,)):
        return "conv1d is not a causal depthwise conv over x, B, C"
    if module.intermediate_size != module.num_heads * module.head_dim:
        return "intermediate_size != num_heads x head_dim"
    if module.conv_dim != module.intermediate_size + 2 * module.n_groups * module.ssm_state_size:
        return "conv_dim is not x + B + C"
    norm = module.norm
    if getattr(module, "mamba_rms_norm", True) and not (hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")):
        return "norm is not the gated RMSNorm"
    return None


def check_falcon_h1(module: torch.nn.Module) -> Optional[str]:
    missing = [a for a in ("ssm_in_multiplier", "mup_vector", "mamba_rms_norm") if not hasattr(module, a)]
    return f"missing attributes {missing}" if missing else check(module)


def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    bsz, seq_len, _ = hidden_states.shape
    dtype = hidden_states.dtype
    heads, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
    multiplier = getattr(self, "ssm_in_multiplier", None)  # Falcon-H1's muP multipliers
    if multiplier is not None:
        hidden_states = hidden_states * multiplier
    projected = self.in_proj(hidden_states)
    if getattr(self, "mup_vector", None) is not None:
        projected = projected * self.mup_vector
    gate, xbc, dt = projected.split([self.intermediate_size, self.conv_dim, heads], dim=-1)
    xbc = torch.ops.autodeploy.causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
    x, b, c = xbc.split([self.intermediate_size, g * n, g * n], dim=-1)
    dt = F.softplus(dt + self.dt_bias.to(dt.dtype))
    lo, hi = self.time_step_limit
    dt = torch.clamp(dt, min=lo, max=hi)
    a = -torch.exp(self.A_log.float())
    x = x.reshape(bsz, seq_len, heads, p)
    y = torch.ops.autodeploy.ssm_scan(x, dt, a, b.reshape(bsz, seq_len, g, n), c.reshape(bsz, seq_len, g, n))
    y = y + self.D[:, None].float() * x.float()
    y = y.reshape(bsz, seq_len, -1)
    y = self.norm(y, gate) if getattr(self, "mamba_rms_norm", True) else y * F.silu(gate)
    return self.out_proj(y.to(dtype))


for _cls in ("BambaMixer", "GraniteMoeHybridMambaLayer", "Zamba2MambaMixer"):
    register_mixer_rewrite(_cls, check, forward)
register_mixer_rewrite("FalconH1Mixer", check_falcon_h1, forward)
