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
from .fp8 import fp8_quantize_values, fp8_token_scale

__all__ = ["gated_act", "gated_act_fp8", "gated", "ACTIVATIONS"]

# name -> the kernel's ACT constant
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_BLOCK = 1024
# The quantizing form holds rows up to this many elements in registers (one program per row; Llama-8B's 14,336)
_FP8_ROW_BLOCK = 16384


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


@triton.jit
def _gated_act_fp8_kernel(
    gate_ptr, up_ptr, q_ptr, s_ptr, stride_g, stride_u, stride_q, N,
    ACT: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr, EMULATE_E4M3: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program per row: the activated row's absmax, then its float8 values. A row that fits one BLOCK is
    held in registers (one read); a longer one is read twice (gate/up recomputed, from L2)."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    OUT_TY: tl.constexpr = gate_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if BLOCK >= N:
        mask = offs < N
        g = tl.load(gate_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        y = gated(g, u, ACT, OUT_TY, EMULATE_RNE).to(tl.float32)
        scale, inv = fp8_token_scale(tl.max(tl.abs(y), axis=0))
        tl.store(s_ptr + row, scale)
        tl.store(q_ptr + row * stride_q + offs, fp8_quantize_values(y, inv, EMULATE_E4M3), mask=mask)
        return
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + offs
        mask = cols < N
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(gated(g, u, ACT, OUT_TY, EMULATE_RNE).to(tl.float32)))
    scale, inv = fp8_token_scale(tl.max(amax, axis=0))
    tl.store(s_ptr + row, scale)
    for start in range(0, N, BLOCK):
        cols = start + offs
        mask = cols < N
        g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = gated(g, u, ACT, OUT_TY, EMULATE_RNE).to(tl.float32)
        tl.store(q_ptr + row * stride_q + cols, fp8_quantize_values(y, inv, EMULATE_E4M3), mask=mask)


def _fp8_row_warps(block: int, rows: int) -> int:
    """Warps of one row's program: one per 1024 columns, at most 16; with many rows at most 8, so that more
    programs share an SM and hide each other's load latency (8B's 14,336 columns at 8,192 rows on an H200:
    191 us with 8 warps against 222 with 16; docs/performance.md)."""
    warps = min(16, max(4, block // 1024))
    return min(warps, 8) if rows >= 256 else warps


def gated_act_fp8(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize_fp8_activation(gated_act(gate, up, act))`` in one launch: (float8 ``[..., N]``, fp32
    per-token scales ``[..., 1]``). The activation is rounded to the inputs' dtype first, as the unfused pair
    computes it."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)}/{gate.dtype} and up {tuple(up.shape)}/{up.dtype} must match")
    n = gate.shape[-1]
    q = torch.empty(gate.shape, dtype=torch.float8_e4m3fn, device=gate.device)
    scale = torch.empty((*gate.shape[:-1], 1), dtype=torch.float32, device=gate.device)
    if q.numel() == 0:
        return q, scale
    g2, u2 = (x.reshape(-1, n) for x in (gate, up))
    g2, u2 = (x if x.stride(-1) == 1 else x.contiguous() for x in (g2, u2))
    block = min(_FP8_ROW_BLOCK, triton.next_power_of_2(n))
    pdl = pdl_enabled(gate.device, "act")
    interp = type(_gated_act_fp8_kernel).__name__ == "InterpretedFunction"
    _gated_act_fp8_kernel[(g2.shape[0],)](
        g2, u2, q.view(-1, n), scale.view(-1), g2.stride(0), u2.stride(0), n, n,
        ACT=ACTIVATIONS[act], BLOCK=block, EMULATE_RNE=emulate_rne(_gated_act_fp8_kernel, gate.dtype),
        EMULATE_E4M3=interp, PDL=pdl, num_warps=_fp8_row_warps(block, g2.shape[0]),
        **launch_options(pdl),
    )
    return q, scale
