"""Gated activation ``act(gate) * up`` in one pass (Triton): the MLP middle of Llama/Qwen/Mistral (SiLU) and
Gemma (GELU, tanh approximation).

Why: eager PyTorch runs the activation and the product as two kernels with a round trip of the activated
tensor through memory; at decode batch sizes each launch costs more than its bytes. ``gate``/``up`` may be
strided views (the two halves of a fused gate/up GEMM's output).

Numerics match PyTorch in the input dtype: the activation is computed in fp32 and rounded to the dtype, then
the product is computed in fp32 and rounded once more (two roundings, like ``silu(a) * b`` in bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.backends.triton.kernels.pdl import launch_options, pdl_enabled, pdl_launch_dependents, pdl_wait

from .rms_norm import cast_rn, emulate_rne

__all__ = ["gated_act", "gated", "ACTIVATIONS"]

# name -> the kernel's ACT constant
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_BLOCK = 1024


@triton.jit
def gated(g, u, ACT: tl.constexpr, out_ty: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """``act(g) * u`` from fp32 values of dtype-rounded inputs, rounded to ``out_ty`` as PyTorch does (the
    activation first, then the product). Shared with the skinny GEMM's gated epilogue (gemv.py)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    else:
        # 0.5 * g * (1 + tanh(x)) == g * sigmoid(2x): no cancellation for negative g
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * inner))
    a = cast_rn(a, out_ty, EMULATE_RNE).to(tl.float32)
    return cast_rn(a * u, out_ty, EMULATE_RNE)


@triton.jit
def _gated_act_kernel(
    gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, N,
    ACT: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, gated(g, u, ACT, out_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)


def gated_act(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for equal-shape, equal-dtype tensors ``[..., N]``; returns a new contiguous tensor."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)}/{gate.dtype} and up {tuple(up.shape)}/{up.dtype} must match")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.shape[-1] if gate.dim() else 1
    if out.numel() == 0:
        return out
    g2, u2 = (x.reshape(-1, n) for x in (gate, up))
    g2, u2 = (x if x.stride(-1) == 1 else x.contiguous() for x in (g2, u2))
    block = min(_BLOCK, triton.next_power_of_2(n))
    pdl = pdl_enabled(gate.device, "act")
    _gated_act_kernel[(g2.shape[0], triton.cdiv(n, block))](
        g2, u2, out.view(-1, n), g2.stride(0), u2.stride(0), n, n,
        ACT=ACTIVATIONS[act], BLOCK=block, EMULATE_RNE=emulate_rne(_gated_act_kernel, gate.dtype),
        PDL=pdl, num_warps=4, **launch_options(pdl),
    )
    return out
