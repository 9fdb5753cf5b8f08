"""Triton backend: an FP8 linear's per-token activation quantization moves into the kernel that produces its
input (RMSNorm, add + RMSNorm, or the gated activation), which holds the whole row anyway, so the absmax costs
no extra pass and no launch: the linear then reads float8 rows and their scales (``triton_fp8_linear_q``).

Without it every FP8 linear quantizes for itself: at batch 1 each program of the skinny GEMM re-reads the whole
activation row for its absmax before streaming weights, and at larger batches ``quantize_fp8_rows`` is a launch
per linear. Only producers whose every user is a dynamically quantized FP8 linear (no static input scale) are
rewritten, so no one else ever sees the float8 rows; the math is ``quant.quantize_fp8_activation`` of the row as
the unfused producer would output it (up to float rounding: reciprocals where the reference divides).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx

from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import arg, getitem, is_op, val


def _dynamic_fp8_users(out: fx.Node) -> Optional[list[fx.Node]]:
    """The FP8 linears reading ``out`` as their activation, when they are all of its users and quantize it per
    token (no static input scale)."""
    users = list(out.users)
    if not users:
        return None
    for u in users:
        if not is_op(u, torch.ops.autodeploy.fp8_linear, torch.ops.autodeploy.triton_fp8_linear):
            return None
        others = [v for i, v in enumerate(u.args) if i] + [v for k, v in u.kwargs.items() if k != "x"]
        if arg(u, 0, "x") is not out or any(v is out for v in others):
            return None
        if arg(u, 3, "input_scale") is not None:
            return None
    return users


def _quantized_outputs(graph: fx.Graph, fused: fx.Node, like: fx.Node, count: int) -> list[fx.Node]:
    """getitem nodes for the fused op's (float8 rows, scales[, residual]), with their fake values."""
    outs = [getitem(graph, fused, i) for i in range(count)]
    v = val(like)
    if v is not None:
        outs[0].meta["val"] = v.new_empty(v.shape, dtype=torch.float8_e4m3fn)
        outs[1].meta["val"] = v.new_empty((*v.shape[:-1], 1), dtype=torch.float32)
    return outs


def _retarget(graph: fx.Graph, users: list[fx.Node], q: fx.Node, scale: fx.Node, out_dtype: torch.dtype) -> None:
    for u in users:
        with graph.inserting_before(u):
            new = graph.call_function(torch.ops.autodeploy.triton_fp8_linear_q.default, (
                q, scale, arg(u, 1, "weight"), arg(u, 2, "weight_scale"), arg(u, 4, "bias"), out_dtype))
        new.meta = dict(u.meta)
        u.replace_all_uses_with(new)
        graph.erase_node(u)


def _row_fits(node: fx.Node) -> bool:
    from autodeploy.backends.triton.kernels.rms_norm import MAX_QUANT_N

    v = val(node)
    return v is not None and v.dim() >= 1 and isinstance(v.shape[-1], int) and v.shape[-1] <= MAX_QUANT_N


@register_pass("fuse_fp8_act_quant")
def fuse_fp8_act_quant(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401
    from autodeploy.backends.triton.kernels import quant_gemm  # noqa: F401 - registers triton_fp8_linear_q

    result = PassResult()
    graph = gm.graph
    counts = {"norm": 0, "add+norm": 0, "gated activation": 0}
    for node in list(graph.nodes):
        is_norm = is_op(node, torch.ops.autodeploy.triton_rms_norm)
        if is_norm or is_op(node, torch.ops.autodeploy.triton_gated_act):
            users = _dynamic_fp8_users(node)
            if users is None or val(node) is None or (is_norm and not _row_fits(node)):
                continue
            op = (torch.ops.autodeploy.triton_rms_norm_fp8.default if is_norm
                  else torch.ops.autodeploy.triton_gated_act_fp8.default)
            with graph.inserting_before(node):
                fused = graph.call_function(op, tuple(node.args))
                q, scale = _quantized_outputs(graph, fused, node, 2)
            _retarget(graph, users, q, scale, val(node).dtype)
            graph.erase_node(node)
            counts["norm" if is_norm else "gated activation"] += 1
        elif is_op(node, torch.ops.autodeploy.triton_fused_add_rms_norm):
            outs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
            normed = outs.get(0)
            if normed is None or len(outs) != len(node.users) or not _row_fits(normed):
                continue
            users = _dynamic_fp8_users(normed)
            if users is None:
                continue
            with graph.inserting_before(node):
                fused = graph.call_function(torch.ops.autodeploy.triton_fused_add_rms_norm_fp8.default,
                                            tuple(node.args))
                q, scale, resid = _quantized_outputs(graph, fused, normed, 3)
            _retarget(graph, users, q, scale, val(normed).dtype)
            if 1 in outs:
                resid.meta = dict(outs[1].meta)
                outs[1].replace_all_uses_with(resid)
                graph.erase_node(outs[1])
            graph.erase_node(normed)
            graph.erase_node(node)
            counts["add+norm"] += 1
    result.num_matches = sum(counts.values())
    if result.num_matches:
        result.notes.append("FP8 activations quantized in their producer kernel: " + ", ".join(
            f"{n} {kind}" for kind, n in counts.items() if n))
    return result
