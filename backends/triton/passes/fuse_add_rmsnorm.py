"""Triton backend: ``r = a + b; y = rms_norm(r)`` becomes one kernel returning ``(y, r)`` (the residual stream
is read once and written once); the remaining RMSNorms become the Triton single-pass kernel."""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.utils import aten, getitem, is_op, same_shape, val
from autodeploy.graph.passes import PassResult, register_pass


@register_pass("fuse_add_rmsnorm")
def fuse_add_rmsnorm(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401

    result = PassResult()
    graph = gm.graph
    fused = plain = 0
    for node in list(graph.nodes):
        if not is_op(node, torch.ops.autodeploy.rms_norm):
            continue
        x, weight, eps = node.args
        a, b = (x.args[0], x.args[1]) if is_op(x, aten.add) and len(x.args) == 2 else (None, None)
        if (isinstance(a, fx.Node) and isinstance(b, fx.Node) and val(a) is not None and val(b) is not None
                and same_shape(val(a).shape, val(b).shape) and not x.kwargs):
            with graph.inserting_after(x):
                f = graph.call_function(torch.ops.autodeploy.triton_fused_add_rms_norm.default, (a, b, weight, eps))
            with graph.inserting_after(f):
                resid = getitem(graph, f, 1)
                normed = getitem(graph, f, 0)
            normed.meta, resid.meta = dict(node.meta), dict(x.meta)
            x.replace_all_uses_with(resid, delete_user_cb=lambda user: user is not f)
            node.replace_all_uses_with(normed)
            graph.erase_node(node)
            fused += 1
        else:
            with graph.inserting_before(node):
                new = graph.call_function(torch.ops.autodeploy.triton_rms_norm.default, (x, weight, eps))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            plain += 1
    result.num_matches = fused + plain
    result.notes.append(f"{fused} add+norm fused, {plain} plain norms")
    return result
