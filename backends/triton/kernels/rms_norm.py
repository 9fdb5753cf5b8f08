"""RMSNorm and fused residual-add + RMSNorm (Triton).

Semantics are exactly HF Llama's ``LlamaRMSNorm``::

    h = x.float(); h = h * rsqrt(mean(h * h, -1) + eps); return weight * h.to(x.dtype)

Note the cast back to the input dtype happens *before* the weight multiply, and the product is
computed in ``promote_types(weight.dtype, x.dtype)`` (as PyTorch would). The fused variant replaces
the graph pattern ``r2 = r + x; y = rms_norm(r2)`` where both ``r2`` and ``y`` are live afterwards,
saving one full read of ``r2``.

One program normalises one row. Rows up to ``_MAX_SINGLE_BLOCK`` elements are held in registers
(one read of the input); longer rows loop twice over the row in ``BLOCK_N`` chunks (sum of squares,
then normalise), recomputing ``x + residual`` in the second pass rather than re-reading the stored
sum, so no intra-program store->load ordering is relied on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autodeploy.backends.triton.kernels.common import rows_2d
from autodeploy.backends.triton.kernels.pdl import launch_options, pdl_enabled, pdl_launch_dependents, pdl_wait
from autodeploy.backends.triton.kernels.fp8 import fp8_quantize_values, fp8_token_scale

__all__ = ["rms_norm", "fused_add_rms_norm", "rms_norm_fp8", "MAX_QUANT_N"]

# Rows the quantizing norm takes (held in registers, see _launch).

# Largest row kept entirely in registers; longer rows use the two-pass loop.
_MAX_SINGLE_BLOCK = 8192
MAX_QUANT_N = _MAX_SINGLE_BLOCK


def emulate_rne(kernel, *dtypes: torch.dtype) -> bool:
    """True when ``kernel`` runs in the Triton interpreter and a bf16 rounding is involved.

    The interpreter (triton 3.9 at least) converts fp32 -> bf16 by truncation; compiled kernels use
    round-to-nearest-even like torch. Kernels pass this as ``EMULATE_RNE`` to :func:`cast_rn`.
    """
    return type(kernel).__name__ == "InterpretedFunction" and torch.bfloat16 in dtypes


@triton.jit
def cast_rn(x, ty: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Cast fp32 ``x`` to ``ty`` rounding to nearest-even (bit-exact with torch's ``.to(ty)``).

    With ``EMULATE_RNE`` the bf16 rounding is done by hand on the fp32 bits, after which the
    (truncating) conversion is exact; otherwise this is a plain ``x.to(ty)``.
    """
    if EMULATE_RNE:
        if ty == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, q_ptr, s_ptr,
    stride_x, stride_r, stride_o, stride_ro, stride_q,
    N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, EMULATE_RNE: tl.constexpr, PDL: tl.constexpr,
    QUANT: tl.constexpr = False, EMULATE_E4M3: tl.constexpr = False,
):
    """QUANT (single pass only): instead of the normalised row, store it quantized to float8 per token
    (``quant.quantize_fp8_activation`` of the row as the unfused norm would output it) at ``q_ptr`` (row stride
    ``stride_q``; ``out_ptr`` only types the rounding) and its fp32 scale at ``s_ptr[row]``: the row is in registers, so its absmax costs no pass."""
    pdl_wait(PDL)
    pdl_launch_dependents(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    r_row = res_ptr + row * stride_r
    o_row = out_ptr + row * stride_o
    ro_row = res_out_ptr + row * stride_ro
    # "Input dtype" of the norm: x's, or that of the residual sum (x + residual promoted).
    if HAS_RES:
        in_ty = res_out_ptr.dtype.element_ty
    else:
        in_ty = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        mask = offs < N
        h = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
            # Round the sum to its dtype exactly as torch's ``x + residual`` does.
            s = cast_rn(h + r, in_ty, EMULATE_RNE)
            tl.store(ro_row + offs, s, mask=mask)
            h = s.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        y = cast_rn(h * rstd, in_ty, EMULATE_RNE)
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            y = y.to(tl.float32) * w.to(tl.float32)
        y = cast_rn(y.to(tl.float32), out_ptr.dtype.element_ty, EMULATE_RNE)
        if QUANT:
            yf = tl.where(mask, y.to(tl.float32), 0.0)
            scale, inv = fp8_token_scale(tl.max(tl.abs(yf), axis=0))
            tl.store(q_ptr + row * stride_q + offs, fp8_quantize_values(yf, inv, EMULATE_E4M3), mask=mask)
            tl.store(s_ptr + row, scale)
        else:
            tl.store(o_row + offs, y, mask=mask)
    else:
        # Pass 1: sum of squares (and the residual sum, stored once).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                s = cast_rn(h + r, in_ty, EMULATE_RNE)
                tl.store(ro_row + cols, s, mask=mask)
                h = s.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        # Pass 2: normalise (recompute the rounded sum instead of reading back our own stores).
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            mask = cols < N
            h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
                h = cast_rn(h + r, in_ty, EMULATE_RNE).to(tl.float32)
            y = cast_rn(h * rstd, in_ty, EMULATE_RNE)
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0)
                y = y.to(tl.float32) * w.to(tl.float32)
            tl.store(o_row + cols, cast_rn(y.to(tl.float32), out_ptr.dtype.element_ty, EMULATE_RNE),
                     mask=mask)


def _launch(x2, r2, weight, out, res_out, eps, block, q=None, scale=None, num_warps=None):
    M, N = x2.shape
    if block is None:
        block = min(triton.next_power_of_2(N), _MAX_SINGLE_BLOCK)
    single = block >= N
    if q is not None and not single:
        raise ValueError(f"the quantizing norm holds the row in registers: N ({N}) must be <= {_MAX_SINGLE_BLOCK}")
    num_warps = num_warps or min(max(block // 256, 1), 16)
    pdl = pdl_enabled(x2.device, "norm")
    interp = type(_rms_norm_kernel).__name__ == "InterpretedFunction"
    _rms_norm_kernel[(M,)](
        x2, r2 if r2 is not None else x2, weight if weight is not None else x2, out,
        res_out if res_out is not None else out, q if q is not None else out, scale if scale is not None else out,
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out.stride(0),
        res_out.stride(0) if res_out is not None else 0, q.stride(0) if q is not None else 0,
        N, float(eps),
        HAS_RES=r2 is not None, HAS_W=weight is not None,
        BLOCK_N=block, SINGLE_PASS=single, num_warps=num_warps, PDL=pdl, **launch_options(pdl),
        QUANT=q is not None, EMULATE_E4M3=interp,
        EMULATE_RNE=emulate_rne(_rms_norm_kernel, x2.dtype, out.dtype,
                                *((res_out.dtype,) if res_out is not None else ())),
    )


def _check_weight(weight, N):
    if weight is None:
        return None
    if weight.shape != (N,):
        raise ValueError(f"weight must be [{N}], got {tuple(weight.shape)}")
    return weight.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *,
             _block: int | None = None) -> torch.Tensor:
    """HF-Llama RMSNorm over the last dim of ``x [..., N]``; returns a new tensor.

    Output dtype is ``promote_types(weight.dtype, x.dtype)`` (x's dtype if ``weight`` is None).
    ``_block`` (power of two) forces the chunk size; only for tests of the multi-block path.
    """
    N = x.shape[-1]
    weight = _check_weight(weight, N)
    out_dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out
    _launch(rows_2d(x), None, weight, out.view(-1, N), None, eps, _block)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       eps: float, *, _block: int | None = None):
    """Return ``(rms_norm(x + residual), x + residual)`` as new tensors (inputs untouched).

    The sum is rounded to ``promote_types(x.dtype, residual.dtype)`` like torch's ``x + residual``
    and that rounded sum is what gets normalised.
    """
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    N = x.shape[-1]
    weight = _check_weight(weight, N)
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    out_dtype = res_dtype if weight is None else torch.promote_types(weight.dtype, res_dtype)
    new_res = torch.empty(x.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if x.numel() == 0:
        return out, new_res
    _launch(rows_2d(x), rows_2d(residual), weight, out.view(-1, N), new_res.view(-1, N), eps, _block)
    return out, new_res


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None):
    """``quant.quantize_fp8_activation(rms_norm(x [+ residual]))`` in the norm's own launch: (float8 rows
    ``[..., N]``, fp32 per-token scales ``[..., 1]``), plus the rounded sum ``x + residual`` when given."""
    N = x.shape[-1]
    weight = _check_weight(weight, N)
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = res_dtype if weight is None else torch.promote_types(weight.dtype, res_dtype)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    new_res = torch.empty(x.shape, dtype=res_dtype, device=x.device) if residual is not None else None
    if x.numel():
        # ``out`` only types the rounding of the normalised row (the unfused norm's output dtype); never written
        typed = torch.empty((1, 1), dtype=out_dtype, device=x.device)
        _launch(rows_2d(x), rows_2d(residual) if residual is not None else None, weight, typed.expand(x.numel() // N, N),
                new_res.view(-1, N) if new_res is not None else None, eps, None, q.view(-1, N), scale.view(-1))
    return (q, scale) if residual is None else (q, scale, new_res)
