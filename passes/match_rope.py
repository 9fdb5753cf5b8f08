"""Match HF's rotary embedding ``x * cos + rotate_half(x) * sin`` on the q and k feeding each canonical
attention, and replace the pair with one ``autodeploy::rope(q, k, cos, sin)`` so a backend can fuse the
rotation with its KV-cache write. Only full-width rotations in the rotate_half layout are matched;
anything else stays as plain (still correct) ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from autodeploy.graph.utils import aten, getitem, is_op, node_order, static_int, val
from autodeploy.graph.passes import PassResult, register_pass


def _rotate_half_source(node) -> Optional[fx.Node]:
    """``cat([-x[..., h:], x[..., :h]], -1)`` -> x."""
    if not is_op(node, aten.cat) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    neg, lo = node.args[0]
    if not is_op(neg, aten.neg) or not is_op(neg.args[0], aten.slice) or not is_op(lo, aten.slice):
        return None
    hi = neg.args[0]
    x = hi.args[0]
    if lo.args[0] is not x or val(x) is None:
        return None
    d = val(x).dim()
    half = static_int(val(x).shape[-1])
    if half is None or half % 2:
        return None
    half //= 2
    if any(s.args[1] % d != d - 1 for s in (hi, lo)) or dim % d != d - 1:
        return None
    if static_int(hi.args[2]) != half or static_int(lo.args[2]) not in (0, None) or static_int(lo.args[3]) != half:
        return None
    return x


def _unsqueezed(node) -> Optional[fx.Node]:
    if is_op(node, aten.unsqueeze) and node.args[1] == 1:
        return node.args[0]
    return None


def match_rope_one(node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """``add(mul(x, cos_u), mul(rotate_half(x), sin_u))`` -> (x, cos, sin)."""
    if not is_op(node, aten.add) or len(node.args) < 2:
        return None
    for a, b in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (is_op(a, aten.mul) and is_op(b, aten.mul)):
            continue
        for rot, sin_u in ((b.args[0], b.args[1]), (b.args[1], b.args[0])):
            x = _rotate_half_source(rot)
            if x is None:
                continue
            for xa, cos_u in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
                cos, sin = _unsqueezed(cos_u), _unsqueezed(sin_u)
                if xa is x and cos is not None and sin is not None:
                    vc = val(cos)
                    if vc is not None and str(vc.shape[-1]) == str(val(x).shape[-1]) and val(x).dim() == 4:
                        return x, cos, sin
    return None


@register_pass("match_rope")
def match_rope(gm: fx.GraphModule, ctx) -> PassResult:
    result = PassResult()
    for attn in list(gm.graph.nodes):
        if not is_op(attn, torch.ops.autodeploy.attention):
            continue
        q_rot, k_rot = attn.args[0], attn.args[1]
        mq, mk = match_rope_one(q_rot), match_rope_one(k_rot)
        if mq is None or mk is None or mq[1:] != mk[1:]:
            continue
        order = node_order(gm.graph)
        with gm.graph.inserting_after(max(q_rot, k_rot, key=order.__getitem__)):
            r = gm.graph.call_function(torch.ops.autodeploy.rope.default, (mq[0], mk[0], mq[1], mq[2]))
            r.meta["val"] = (val(q_rot), val(k_rot))
        with gm.graph.inserting_after(r):
            q_new, k_new = getitem(gm.graph, r, 0), getitem(gm.graph, r, 1)
        q_new.meta = dict(q_rot.meta)
        k_new.meta = dict(k_rot.meta)
        q_rot.replace_all_uses_with(q_new)
        k_rot.replace_all_uses_with(k_new)
        result.num_matches += 1
    return result
