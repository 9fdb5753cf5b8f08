"""Drop HF's repeat_kv (unsqueeze -> expand -> reshape) in front of canonical attention, which is GQA-native.

Runs after attention matching on purpose: repeat_kv is only removable where its consumer understands
``Hkv < Hq``, and that is known once attention is canonical.
"""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, val
from autodeploy.graph.passes import PassResult, register_pass


def _repeat_source(x) -> fx.Node | None:
    """Return ``src`` if ``x`` is ``reshape(expand(unsqueeze(src, 2)))`` repeating heads, else None."""
    if not is_op(x, aten.reshape, aten.view, aten._unsafe_view):
        return None
    exp = x.args[0]
    if is_op(exp, aten.clone):
        exp = exp.args[0]
    if not is_op(exp, aten.expand) or not is_op(exp.args[0], aten.unsqueeze) or exp.args[0].args[1] != 2:
        return None
    src = exp.args[0].args[0]
    vs, vx = val(src), val(x)
    if vs is None or vx is None or vs.dim() != 4 or vx.dim() != 4:
        return None
    try:
        n_rep = int(vx.shape[1]) // int(vs.shape[1])
    except Exception:
        return None
    return src if n_rep >= 1 and int(vs.shape[1]) * n_rep == int(vx.shape[1]) else None


@register_pass("remove_repeat_kv")
def remove_repeat_kv(gm: fx.GraphModule, ctx) -> PassResult:
    result = PassResult()
    for node in gm.graph.nodes:
        if not is_op(node, torch.ops.autodeploy.attention):
            continue
        args = list(node.args)
        for i in (1, 2):
            src = _repeat_source(args[i])
            if src is not None:
                args[i] = src
                result.num_matches += 1
        node.args = tuple(args)
    return result
