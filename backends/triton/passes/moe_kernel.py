"""Triton backend: ``autodeploy::moe_experts`` runs on the fused grouped-GEMM kernel (kernels/moe.py), and so does
``autodeploy::moe_experts_quant``: int8-weight experts (int8 weights converted as loaded, the scales applied to the
sums), fp8 experts (token and intermediate rows quantized to E4M3 per row, E4M3 MMAs, both scales on the sums) and
W8A8 int8 experts (the same with int8 rows and exact int32 sums).
Each device checks the quantized kernels against the reference once before using them.

The torch reference runs one GEMM triple per expert with a host sync for the per-expert counts (or, inside a
CUDA-graph capture, every expert on every token); the kernel runs all experts in two launches with no sync. Layers
whose activation or dtype the kernel lacks keep the reference, and the note says why.
"""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import getattr_path, is_op, val
from autodeploy.ops.moe import moe_inputs, moe_quant_inputs


@register_pass("moe_kernel")
def moe_kernel(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton.kernels import moe

    result = PassResult()
    kept = []
    for node in list(gm.graph.nodes):
        quantized = is_op(node, torch.ops.autodeploy.moe_experts_quant)
        if not (quantized or is_op(node, torch.ops.autodeploy.moe_experts)):
            continue
        args = moe_quant_inputs(node) if quantized else moe_inputs(node)
        w = val(args["hidden"] if quantized else args["w_gate"])
        if w is None and not quantized and getattr(args["w_gate"], "op", None) == "get_attr":
            w = getattr_path(gm, args["w_gate"].target)
        ok, why = moe.kernel_supports(args["activation"], w.dtype if w is not None else None,
                                      args["mode"] if quantized else None)
        if not ok:
            kept.append(why)
            continue
        node.target = (torch.ops.autodeploy.triton_moe_experts_quant.default if quantized
                       else torch.ops.autodeploy.triton_moe_experts.default)
        result.num_matches += 1
    if result.num_matches:
        result.notes.append(f"{result.num_matches} MoE experts layers run the fused Triton kernel")
    for why in dict.fromkeys(kept):
        result.notes.append(f"MoE layers kept on the torch reference: {why}")
    return result
