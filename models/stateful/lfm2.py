"""LFM2 / LFM2-MoE short conv: ``out_proj(C * causal_conv(B * x))`` with ``B, C, x = in_proj(h).chunk(3)``."""

from __future__ import annotations

from typing import Optional

import torch

from autodeploy.models.stateful import register_mixer_rewrite
from autodeploy.ops import mixers  # noqa: F401  (registers the canonical ops)


def check(module: torch.nn.Module) -> Optional[str]:
    conv = getattr(module, "conv", None)
    if not isinstance(conv, torch.nn.Conv1d) or not all(hasattr(module, a) for a in ("in_proj", "out_proj")):
        return "no conv/in_proj/out_proj submodules"
    c, k = conv.in_channels, conv.kernel_size[0]
    if not (conv.groups == c == conv.out_channels and conv.padding == (k - 1,) and conv.stride == (1,)
            and conv.dilation == (1,)):
        return f"conv is not a causal depthwise conv (groups={conv.groups}, padding={conv.padding})"
    if module.in_proj.out_features != 3 * c:
        return f"in_proj gives {module.in_proj.out_features} features, not 3 x {c}"
    return None


def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    b, c, x = self.in_proj(hidden_states).chunk(3, dim=-1)
    y = torch.ops.autodeploy.causal_conv1d(b * x, self.conv.weight.squeeze(1), self.conv.bias, "")
    return self.out_proj(c * y)


for _cls in ("Lfm2ShortConv", "Lfm2MoeShortConv"):
    register_mixer_rewrite(_cls, check, forward)
