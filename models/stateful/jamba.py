"""Jamba's Mamba-1 mixer (``JambaMambaMixer``): in_proj -> (x, gate); silu(causal conv(x)); x_proj -> (dt, B, C)
with Jamba's RMS norms on each; ``dt = softplus(dt_proj(dt))``; the selective scan with ``A = -exp(A_log)``
(``[D, N]``: one rate per channel and state dimension) plus the ``D`` skip, gated by ``silu(gate)``; out_proj.

Only the form verified against HF eager is rewritten: SiLU conv activation, a causal depthwise conv over the
``D = intermediate_size`` channels, the three norms present, ``A_log`` of ``[D, N]``. Anything else keeps HF's
forward and is refused by the mixer check, naming the layer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from autodeploy.models.stateful import missing_form, register_mixer_rewrite
from autodeploy.ops import mixers  # noqa: F401  (registers the canonical ops)

_ATTRS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj", "dt_layernorm", "b_layernorm",
          "c_layernorm", "intermediate_size", "ssm_state_size", "time_step_rank", "activation")


def _is_rms_norm(norm: torch.nn.Module, size: int) -> bool:
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__ == "JambaRMSNorm" and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (size,) and hasattr(norm, "variance_epsilon"))


def check(module: torch.nn.Module) -> Optional[str]:
    why = missing_form(module, _ATTRS, silu=True)
    if why:
        return why
    d, n, rank = module.intermediate_size, module.ssm_state_size, module.time_step_rank
    conv = module.conv1d
    k = conv.kernel_size[0]
    if not (isinstance(conv, torch.nn.Conv1d) and conv.groups == conv.in_channels == conv.out_channels == d
            and conv.padding == (k - 1,) and conv.stride == (1,) and conv.dilation == (1,)):
        return "conv1d is not a causal depthwise conv over the intermediate channels"
    if module.in_proj.out_features != 2 * d:
        return f"in_proj gives {module.in_proj.out_features} features, not x + gate (2 x {d})"
    if module.x_proj.out_features != rank + 2 * n or module.x_proj.in_features != d:
        return f"x_proj is not {d} -> dt ({rank}) + B + C ({n} each)"
    if module.dt_proj.in_features != rank or module.dt_proj.out_features != d or module.dt_proj.bias is None:
        return f"dt_proj is not {rank} -> {d} with a bias"
    if tuple(module.A_log.shape) != (d, n) or tuple(module.D.shape) != (d,):
        return f"A_log {tuple(module.A_log.shape)} / D {tuple(module.D.shape)} are not [{d}, {n}] / [{d}]"
    for name, size in (("dt_layernorm", rank), ("b_layernorm", n), ("c_layernorm", n)):
        if not _is_rms_norm(getattr(module, name), size):
            return f"{name} is not Jamba's RMSNorm over {size} features"
    return None


def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    dtype = hidden_states.dtype
    n, rank = self.ssm_state_size, self.time_step_rank
    x, gate = self.in_proj(hidden_states).chunk(2, dim=-1)
    x = torch.ops.autodeploy.causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
    time_step, b, c = self.x_proj(x).split([rank, n, n], dim=-1)
    time_step, b, c = self.dt_layernorm(time_step), self.b_layernorm(b), self.c_layernorm(c)
    dt = F.softplus(self.dt_proj(time_step))
    a = -torch.exp(self.A_log.float())
    y = torch.ops.autodeploy.selective_scan(x, dt, a, b, c)
    y = (y + x.float() * self.D.float()) * F.silu(gate)
    return self.out_proj(y.to(dtype))


register_mixer_rewrite("JambaMambaMixer", check, forward)
