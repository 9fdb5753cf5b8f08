"""Match HF's Llama-style RMSNorm ``w * (x_f * rsqrt(mean(x_f^2, -1) + eps)).to(x.dtype)`` (with x_f the
fp32 upcast of x) and replace it with ``autodeploy::rms_norm``. Gemma's ``(1 + w)`` variant has different
rounding in low precision and is left as plain ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, scalar_constant, val
from autodeploy.graph.passes import PassResult, register_pass

_CASTS = (aten.to, aten._to_copy)


def _strip_casts(x):
    while is_op(x, *_CASTS):
        x = x.args[0]
    return x


def _match(gm: fx.GraphModule, rsqrt: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node, float]]:
    add = rsqrt.args[0]
    if not is_op(add, aten.add):
        return None
    eps = scalar_constant(gm, add.args[1])
    mean = add.args[0]
    if eps is None or not is_op(mean, aten.mean) or list(mean.args[1]) not in ([-1],) or not (
        len(mean.args) > 2 and mean.args[2]
    ):
        return None
    sq = mean.args[0]
    if not (is_op(sq, aten.pow) and sq.args[1] == 2) and not (is_op(sq, aten.mul) and sq.args[0] is sq.args[1]):
        return None
    xf = sq.args[0]
    norm = next((u for u in rsqrt.users if is_op(u, aten.mul) and xf in u.args), None)
    if norm is None or len(rsqrt.users) != 1:
        return None
    x = _strip_casts(xf)
    vx = val(x)
    if vx is None or (xf is not x and val(xf).dtype != torch.float32):
        return None
    cur = norm
    if len(cur.users) == 1 and is_op(next(iter(cur.users)), *_CASTS):
        cur = next(iter(cur.users))
        if val(cur) is None or val(cur).dtype != vx.dtype:
            return None
    elif vx.dtype != torch.float32:
        return None
    if len(cur.users) != 1:
        return None
    out = next(iter(cur.users))
    if not is_op(out, aten.mul):
        return None
    weight = out.args[1] if out.args[0] is cur else out.args[0]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or val(weight) is None or val(weight).dim() != 1:
        return None
    return x, weight, out, eps


@register_pass("match_rmsnorm")
def match_rmsnorm(gm: fx.GraphModule, ctx) -> PassResult:
    result = PassResult()
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.rsqrt):
            continue
        m = _match(gm, node)
        if m is None:
            continue
        x, weight, out, eps = m
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.ops.autodeploy.rms_norm.default, (x, weight, eps))
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        result.num_matches += 1
    return result
