"""Canonical rotary position embedding (HF "rotate_half" / NeoX convention).

q/k ``[B, H, S, D]``, cos/sin ``[B, S, D]`` already in q's dtype (HF computes them once per forward from
``position_ids``). Numerics follow HF's ``apply_rotary_pos_emb`` op for op, so matching is exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@torch.library.custom_op("autodeploy::rope", mutates_args=())
def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q and k together, so a backend can fuse the rotation with the KV-cache write."""
    return rope_reference(q, k, cos, sin)


@rope.register_fake
def _rope_fake(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)
