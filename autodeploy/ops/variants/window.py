"""Sliding-window attention (Mistral, Gemma 2/3, GPT-Neo local layers): a query sees the ``w`` most recent keys,
itself included (HF's convention ``i - j < w``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.ops.variants.base import AttentionVariant, Param, register_variant


def _mask(w: int, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    return (q_pos.unsqueeze(-1) - kv_pos.unsqueeze(-2)) < w


def _form(allowed: Tensor, causal: Tensor) -> Optional[int]:
    """The window ``w`` if ``allowed`` is exactly the causal band of width ``w``."""
    sq, skv = allowed.shape
    widest = int(allowed.sum(-1).max())
    if widest >= skv or widest < 1:
        return None
    i = (skv - sq) + torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    return widest if bool((allowed == (causal & ((i - j) < widest))).all()) else None


register_variant(AttentionVariant(
    name="sliding_window", order=0,
    params=(Param("sliding_window", "int?", "keys visible to a query, itself included (None: all)"),),
    doc=__doc__, mask_mod=_mask, mask_form=_form,
    metadata_fields=("decode_work:window=W", "decode_split_start:window=W"),
))
