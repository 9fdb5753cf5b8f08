"""Triton backend: ``act(gate) * up`` (SiLU, or GELU with the tanh approximation) becomes one kernel.

The MLP middle of gated models is two elementwise kernels in the exported graph; at decode batch sizes their
launches cost more than their bytes, and the activated tensor round-trips through memory for nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, val
from autodeploy.graph.passes import PassResult, register_pass

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _activation(node: fx.Node) -> Optional[str]:
    """The activation name of a single-use activation node, else None."""
    if len(node.users) != 1:
        return None
    if is_op(node, aten.silu):
        return "silu"
    if is_op(node, aten.gelu) and (node.kwargs.get("approximate") == "tanh"
                                   or (len(node.args) > 1 and node.args[1] == "tanh")):
        return "gelu_tanh"
    return None


@register_pass("fuse_gated_act")
def fuse_gated_act(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401

    result = PassResult()
    graph = gm.graph
    kinds: dict[str, int] = {}
    for node in list(graph.nodes):
        if not is_op(node, aten.mul.Tensor) or len(node.args) != 2 or node.kwargs:
            continue
        for act_node, up in (node.args, node.args[::-1]):
            if not isinstance(act_node, fx.Node) or not isinstance(up, fx.Node):
                continue
            act = _activation(act_node)
            gate = act_node.args[0] if act else None
            vg, vu, vo = val(gate), val(up), val(node)
            if (act is None or vg is None or vu is None or vo is None or vg.shape != vu.shape
                    or not vg.dtype == vu.dtype == vo.dtype or vg.dtype not in _FLOATS):
                continue
            with graph.inserting_before(node):
                new = graph.call_function(torch.ops.autodeploy.triton_gated_act.default, (gate, up, act))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(act_node)
            kinds[act] = kinds.get(act, 0) + 1
            result.num_matches += 1
            break
    if kinds:
        result.notes.append(", ".join(f"{n}x {k}" for k, n in sorted(kinds.items())))
    return result
