"""Triton backend: linears run their batch-1 rows on the skinny-GEMM kernel.

At batch-1 decode every GEMM is a weight read (M=1); the kernel in ``backends/triton/kernels/gemv.py`` gets
closer to the bandwidth floor than cuBLAS (for every output width from ``GEMV_MIN_N`` up, now all of them). The
replacement op picks the kernel per call from the row count (a host-known shape), so prefill and larger batches
still use cuBLAS.
"""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, val
from autodeploy.graph.passes import PassResult, register_pass

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@register_pass("skinny_gemm")
def skinny_gemm(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401
    from autodeploy.backends.triton.kernels import gemv

    result = PassResult()
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        w = val(node.args[1])
        if w is None or w.dim() != 2 or w.dtype not in _DTYPES or w.shape[0] < gemv.GEMV_MIN_N:
            continue
        node.target = torch.ops.autodeploy.triton_linear.default
        result.num_matches += 1
    if result.num_matches:
        only = f" (N >= {gemv.GEMV_MIN_N})" if gemv.GEMV_MIN_N > 0 else ""
        result.notes.append(f"batch-1 rows of {result.num_matches} linears{only} use the skinny-GEMM kernel")
    return result
