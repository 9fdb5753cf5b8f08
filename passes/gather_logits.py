"""Compute logits only for the rows the sampler needs: gather hidden states by ``logits_index`` right before
the LM head. In a 2k-token prefill this turns a ``[2k, vocab]`` projection into ``[1, vocab]``."""

from __future__ import annotations

from torch import fx

from autodeploy.graph.utils import add_placeholder, aten, is_op
from autodeploy.graph.passes import PassResult, register_pass

# Ops allowed between the LM head and the graph output (Gemma's final softcap, casts).
_ELEMENTWISE = (aten.mul, aten.div, aten.tanh, aten.to, aten._to_copy, aten.add, aten.sub, aten.alias)


def _lm_head(node) -> fx.Node | None:
    while isinstance(node, fx.Node):
        if is_op(node, aten.linear, aten.matmul, aten.mm):
            return node
        if not is_op(node, *_ELEMENTWISE):
            return None
        node = node.args[0]
    return None


@register_pass("gather_logits")
def gather_logits(gm: fx.GraphModule, ctx) -> PassResult:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    head = _lm_head(logits)
    if head is None:
        return PassResult(0, ["no LM head found before the output; all token logits are computed"])
    index = add_placeholder(gm, "logits_index")
    hidden = head.args[0]
    with gm.graph.inserting_before(head):
        picked = gm.graph.call_function(aten.index_select.default, (hidden, 1, index))
    head.replace_input_with(hidden, picked)
    return PassResult(1, [f"LM head {head.name} now projects only the gathered rows"])
