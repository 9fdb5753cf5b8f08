"""Logit soft-capping (Gemma 2): ``s = c * tanh(s / c)`` on the scaled scores, before the mask."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx

from autodeploy.graph.utils import aten, is_op, scalar_constant
from autodeploy.ops.variants.base import AttentionVariant, EagerForm, Param, register_variant

_CASTS = (aten.to, aten._to_copy, aten.type_as)


def _score_mod(c: float, scores: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
    return torch.tanh(scores / c) * c


def _skip_casts(x):
    while is_op(x, *_CASTS):
        x = x.args[0]
    return x


def _match(gm: fx.GraphModule, x: fx.Node) -> Optional[tuple[float, fx.Node]]:
    """``mul(tanh(div(s, c)), c)`` -> ``(c, s)``."""
    if not is_op(x, aten.mul) or not is_op(_skip_casts(x.args[0]), aten.tanh):
        return None
    cap = scalar_constant(gm, x.args[1])
    inner = _skip_casts(x.args[0]).args[0]
    if cap is None or not is_op(inner, aten.div) or scalar_constant(gm, inner.args[1]) != cap:
        return None
    return cap, inner.args[0]


register_variant(AttentionVariant(
    name="softcap", order=10,
    params=(Param("logit_softcap", "float?", "cap c of c * tanh(s / c) (None: off)"),),
    doc=__doc__, score_mod=_score_mod, eager_forms=(EagerForm(scores=_match),),
))
