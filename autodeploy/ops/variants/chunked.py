"""Chunked local attention (Llama-4 ``attention_chunk_size``): the sequence is cut into chunks of ``c`` positions
and a query sees only the (causal) keys of its own chunk: ``i // c == j // c``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.ops.variants.base import AttentionVariant, Param, register_variant


def _mask(c: int, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    return (q_pos.unsqueeze(-1) // c) == (kv_pos.unsqueeze(-2) // c)


def _form(allowed: Tensor, causal: Tensor) -> Optional[int]:
    """The chunk size ``c`` if ``allowed`` is exactly causal within chunks of ``c`` (read off the first row whose
    earliest visible key is itself, then checked on every entry)."""
    sq, skv = allowed.shape
    i = (skv - sq) + torch.arange(sq)
    first = allowed.float().argmax(-1)
    starts = [int(p) for p, f in zip(i.tolist(), first.tolist()) if p > 0 and f == p]
    if not starts:
        return None
    c = starts[0]
    expected = causal & _mask(c, i, torch.arange(skv))
    return c if bool((allowed == expected).all()) else None


register_variant(AttentionVariant(
    name="chunked", order=40,
    params=(Param("chunk_size", "int?", "attention chunk size (None: no chunking)"),),
    doc=__doc__, mask_mod=_mask, mask_form=_form,
))
