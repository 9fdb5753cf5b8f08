"""Attention sinks: one learned logit per query head that joins the softmax denominator and adds no value,
``p_j = exp(s_j) / (sum_k exp(s_k) + exp(sink[h]))``.

Two graph forms are recognised:
* gpt-oss: the sink is concatenated as an extra score column, ``softmax(cat([s, sink]) - max)[..., :-1]``;
* GraniteSWA: the output is rescaled after the fact, ``(softmax(s) @ v) * sigmoid(logsumexp(s) - sink)``,
  which is the same thing (``sigmoid(lse - sink) = sum exp(s) / (sum exp(s) + exp(sink))``).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, fx

from autodeploy.graph.utils import aten, is_op
from autodeploy.ops.variants.base import AttentionVariant, EagerForm, Param, register_variant

_CASTS = (aten.to, aten._to_copy, aten.type_as)
_SHAPE_OPS = (aten.expand, aten.reshape, aten.view, aten.unsqueeze, aten._unsafe_view) + _CASTS


def _strip(x, ops=_CASTS):
    while is_op(x, *ops):
        x = x.args[0]
    return x


def _extra_logit(sinks: Tensor) -> Tensor:
    return sinks


def _reaches(x: fx.Node, targets: tuple, depth: int = 24) -> bool:
    stack, seen = [(x, 0)], set()
    while stack:
        n, d = stack.pop()
        if n in seen or d > depth:
            continue
        seen.add(n)
        if is_op(n, *targets):
            return True
        stack.extend((a, d + 1) for a in n.all_input_nodes)
    return False


def _concat_form(gm: fx.GraphModule, x: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """``cat([scores, sink_column], -1)`` -> ``(sink source, scores)``."""
    if not is_op(x, aten.cat) or len(x.args[0]) != 2:
        return None
    dim = x.args[1] if len(x.args) > 1 else 0
    scores, column = x.args[0]
    if dim not in (-1, 3) or _reaches(column, (aten.matmul, aten.bmm, aten.baddbmm)):
        return None
    return _strip(column, _SHAPE_OPS), scores


def _lse_scale_form(gm: fx.GraphModule, pv: fx.Node, scores: fx.Node):
    """``pv * sigmoid(logsumexp(scores, -1) - sink)`` -> ``(sink source, the mul, {logsumexp})``."""
    if len(pv.users) != 1:
        return None
    mul = next(iter(pv.users))
    if not is_op(mul, aten.mul):
        return None
    other = mul.args[1] if mul.args[0] is pv else mul.args[0]
    sig = _strip(other, (aten.unsqueeze,) + _CASTS)
    if not is_op(sig, aten.sigmoid):
        return None
    sub = _strip(sig.args[0])
    if not is_op(sub, aten.sub) or not is_op(sub.args[0], aten.logsumexp):
        return None
    lse = sub.args[0]
    if _strip(lse.args[0]) is not _strip(scores) or list(lse.args[1]) not in ([-1], [3]):
        return None
    if _reaches(sub.args[1], (aten.matmul, aten.bmm, aten.baddbmm)):
        return None
    return _strip(sub.args[1], _SHAPE_OPS), mul, {lse}


register_variant(AttentionVariant(
    name="sinks", order=20,
    params=(Param("sinks", "Tensor?", "per-query-head sink logit [Hq] (None: off)"),),
    doc=__doc__, extra_logit=_extra_logit,
    eager_forms=(EagerForm(softmax_input=_concat_form, strip_probs=True), EagerForm(output=_lse_scale_form)),
))
