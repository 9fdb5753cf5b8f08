"""Triton backend: quantized linears (``int8_weight_linear``, ``int8_linear``, ``fp8_linear``) run their decode
rows (at most ``QGEMV_MAX_M``; ``INT8W_TC_MAX_M`` for int8 weight-only where K allows the tensor-core form) on
the skinny quantized GEMM (``kernels/quant_gemm.py``), which streams the one-byte weights once; int8 weight-only
up to ``INT8W_GEMM_MAX_M`` rows and W8A8 int8 up to ``W8A8_GEMM_MAX_M`` on the tiled int8 GEMMs
(``kernels/int8_gemm.py``); more rows keep the canonical op (its device fast paths, e.g. ``torch._scaled_mm``).
The replacement op takes the same arguments by name and decides per call from the row count."""

from __future__ import annotations

from torch import fx

from autodeploy.graph.passes import PassResult, register_pass


@register_pass("quant_skinny_gemm")
def quant_skinny_gemm(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton.kernels.quant_gemm import (INT8W_GEMM_MAX_M, INT8W_TC_MAX_M, QGEMV_MAX_M,
                                                                SKINNY_OPS, W8A8_GEMM_MAX_M)

    result = PassResult()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SKINNY_OPS:
            node.target = SKINNY_OPS[node.target]
            result.num_matches += 1
    if result.num_matches:
        result.notes.append(f"rows <= {QGEMV_MAX_M} (int8 weight-only: <= {INT8W_TC_MAX_M}) of "
                            f"{result.num_matches} quantized linears use the skinny quantized GEMM (int8 "
                            f"weight-only up to {INT8W_GEMM_MAX_M} rows and W8A8 int8 up to {W8A8_GEMM_MAX_M}: the "
                            f"tiled int8 GEMMs)")
    return result
