"""Triton backend: a fused gate/up linear whose halves feed only the gated activation becomes one op, so a
batch-1 decode step runs the activation in the skinny GEMM's epilogue instead of a kernel of its own.

At batch 1 the activation kernel moves 16 KB but sits in the chain of dependent kernels between the gate/up
GEMM and the down GEMM, once per layer. Folding it into the *down* GEMM's prologue was measured slower (every
weight tile then also loads and activates gate and up, docs/performance.md); the gate/up GEMM's epilogue runs
once per output after the weight stream, so it costs the stream nothing. Several rows still run cuBLAS and the
gated-activation kernel (the op decides per call).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, static_int, val
from autodeploy.graph.passes import PassResult, register_pass


def _halves(gate: fx.Node, up: fx.Node) -> Optional[tuple[fx.Node, bool]]:
    """(the fused linear, gate_first) when gate/up are the two equal halves of one single-use linear's split."""
    if not (gate.target is up.target is operator.getitem) or gate.args[0] is not up.args[0]:
        return None
    split = gate.args[0]
    if not is_op(split, aten.split_with_sizes) or len(split.users) != 2:
        return None
    sizes, dim = split.args[1], split.args[2] if len(split.args) > 2 else 0
    out = val(split.args[0])
    if out is None or len(sizes) != 2 or static_int(sizes[0]) is None or sizes[0] != sizes[1]:
        return None
    if dim % out.dim() != out.dim() - 1 or {gate.args[1], up.args[1]} != {0, 1}:
        return None
    linear = split.args[0]
    if not is_op(linear, torch.ops.autodeploy.triton_linear) or len(linear.users) != 1:
        return None
    if len(gate.users) != 1 or len(up.users) != 1:
        return None
    return linear, gate.args[1] == 0


@register_pass("fuse_gemv_gated_act")
def fuse_gemv_gated_act(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401

    result = PassResult()
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_op(node, torch.ops.autodeploy.triton_gated_act):
            continue
        gate, up, act = node.args
        found = _halves(gate, up)
        if found is None:
            continue
        linear, gate_first = found
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.autodeploy.triton_linear_gated_act.default,
                                      (x, weight, bias, act, gate_first))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        split = gate.args[0]
        for dead in (node, gate, up, split, linear):
            graph.erase_node(dead)
        result.num_matches += 1
    if result.num_matches:
        result.notes.append(f"{result.num_matches} gate/up GEMMs compute the activation in their batch-1 epilogue")
    return result
