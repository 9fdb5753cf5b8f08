"""Fused MoE experts (Triton): ``autodeploy::moe_experts`` as two grouped GEMMs over all experts.

Why: HF's experts run one GEMM triple per expert (or a gather per token); at decode batch sizes each expert's
GEMMs are launch- and latency-bound and the per-expert token lists need host syncs. Here:

1. :func:`align_by_expert` sorts the (token, pick) pairs by expert (one sort, one histogram) and lays them out in
   tiles of ``BLOCK_M`` rows that each belong to one expert (expert segments padded to the tile size, as vLLM's
   ``moe_align_block_size``). Everything is sized from shapes, so no host sync and CUDA-graph capturable.
2. One launch computes gate and up for every tile (two accumulators over one read of the token rows) and applies
   the activation in the epilogue, writing ``inter[rows, I]``.
3. One launch computes down for every tile and writes each pair's output row ``y[pair, H]``.
4. The combine sums the K picks of each token weighted by the routing weights in fp32.

Quantized experts (``moe_experts_quant``) run the same launches: int8-weight weights are converted to the
activation dtype as they are loaded; for E4M3 weights the token rows and the intermediate rows are quantized to
E4M3 per row first (one launch each) and the MMAs take E4M3 operands; W8A8 int8 the same with int8 rows and int32
sums on the integer MMAs; the scales multiply the fp32 sums. Each device checks
these kernels against the reference once before they serve (``_quant_kernels_agree``).

Weights may be strided views (the op's contract); every stride is passed. Under ``TRITON_INTERPRET=1`` the
interpreter's low-precision ``tl.dot`` is wrong, so operands are upcast to fp32 there only; fp32 weights use
IEEE products (no TF32) so fp32 models match the reference.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from autodeploy.backends.triton.kernels.rms_norm import cast_rn, emulate_rne
from autodeploy.backends.triton.kernels.device_check import kernels_agree
from autodeploy.backends.triton.kernels.quant_gemm import quantize_fp8_rows, quantize_int8_rows
from autodeploy.ops.moe import MoEError, check_inputs, check_quant_inputs, moe_quant_reference

log = logging.getLogger(__name__)

__all__ = ["fused_moe", "align_by_expert", "KERNEL_ACTIVATIONS", "KERNEL_QUANT_MODES", "kernel_supports"]

# op activation name -> the kernels' ACT constant
KERNEL_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "swiglu_clamped": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# moe_experts_quant mode -> the kernels' QUANT constant (0: float experts)
_QUANT = {"int8-weight": 1, "fp8": 2, "int8": 3}
KERNEL_QUANT_MODES = tuple(_QUANT)


def kernel_supports(activation: str, dtype: torch.dtype, mode: Optional[str] = None) -> tuple[bool, str]:
    """Whether the kernels run a layer: ``dtype`` is the weights' (float experts) or the model's (``mode``, a
    ``moe_experts_quant`` mode)."""
    if activation not in KERNEL_ACTIVATIONS:
        return False, f"activation {activation!r} has no kernel epilogue (kernels run {sorted(KERNEL_ACTIVATIONS)})"
    if mode is not None and mode not in KERNEL_QUANT_MODES:
        return False, f"quantized experts {mode!r} have no kernel (kernels run {list(KERNEL_QUANT_MODES)})"
    if dtype not in _DTYPES:
        return False, f"dtype {dtype} not supported"
    return True, "supported"


def block_m_for(pairs: int, experts: int) -> int:
    """Rows per tile from the mean pairs per expert (host-known shapes). Decode is weight-bound: a tile per busy
    expert reads its weights once, so tiles are sized for about twice the mean load (padding rows cost FLOPs the
    GPU has to spare, a second tile costs a second weight read)."""
    busy = 2 * pairs / max(experts, 1)
    return 16 if busy <= 16 else 32 if busy <= 32 else 64


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_pair[R], tile_expert[R // block_m])``: row ``r`` of the tiled layout holds pair ``row_pair[r]``
    (``pair = token * K + k``; ``T * K`` marks a padding row); tile ``b`` belongs to expert ``tile_expert[b]``
    (``num_experts`` marks an unused tile). ``R`` is an upper bound from shapes alone."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    P, E, dev = flat.numel(), num_experts, flat.device
    sorted_e, order = torch.sort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    rank = torch.arange(P, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    pos = (padded_end - padded)[sorted_e] + rank
    rows = triton.cdiv(P + E * (block_m - 1), block_m) * block_m
    row_pair = torch.full((rows,), P, dtype=torch.int32, device=dev)
    row_pair.scatter_(0, pos, order.to(torch.int32))
    tile_start = torch.arange(0, rows, block_m, device=dev)
    tile_expert = torch.searchsorted(padded_end, tile_start, right=True).to(torch.int32)
    return row_pair, tile_expert


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr):
    if QUANT == 3:  # W8A8 int8: exact int32 sums (the integer MMAs; exact under the interpreter too)
        return tl.dot(a, b, out_dtype=tl.int32)
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_a(ptrs, mask, QUANT: tl.constexpr):
    """A tile of token (or intermediate) rows; E4M3 rows are passed as bytes, so masked lanes read a zero byte
    (+0.0) and then are viewed as E4M3 (a float ``other`` cannot be cast to float8)."""
    if QUANT == 2:  # (one return: compiled Triton types every return of a function alike)
        a = tl.load(ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
    elif QUANT == 3:
        a = tl.load(ptrs, mask=mask, other=0)
    else:
        a = tl.load(ptrs, mask=mask, other=0.0)
    return a


@triton.jit
def _load_w(ptrs, mask, QUANT: tl.constexpr, OUT_TY: tl.constexpr, UPCAST: tl.constexpr):
    """A weight tile as the MMA takes it: float weights as stored, int8-weight converted to the activation dtype
    (exact; fp32 under the interpreter, whose bf16 casts fail), E4M3 as stored (bytes viewed as E4M3), W8A8 int8
    as stored."""
    if QUANT == 2:
        w = tl.load(ptrs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
    elif QUANT == 3:
        w = tl.load(ptrs, mask=mask, other=0)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0)
        if QUANT == 1:
            w = w.to(tl.float32 if UPCAST else OUT_TY)
    return w


@triton.jit
def _act(g, u, ACT: tl.constexpr, alpha, limit):
    """The gated activation on fp32 values (ops/moe.py ACTIVATIONS)."""
    if ACT == 0:
        r = g / (1.0 + tl.exp(-g)) * u
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        r = g / (1.0 + tl.exp(-2.0 * inner)) * u
    elif ACT == 2:
        r = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    elif ACT == 3:
        r = tl.maximum(g, 0.0) * u
    else:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        r = (u + 1.0) * (g / (1.0 + tl.exp(-g * alpha)))
    return r


@triton.jit
def _gate_up_kernel(x_ptr, xs_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, wsg_ptr, wsu_ptr, inter_ptr, row_pair_ptr,
                    tile_expert_ptr, P, E, TOPK, H, I,
                    sx_t, sx_h, sg_e, sg_i, sg_h, su_e, su_i, su_h, sbg_e, sbg_i, sbu_e, sbu_i, s_inter,
                    alpha, limit,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_TY: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, EMULATE_RNE: tl.constexpr, QUANT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """QUANT (``_QUANT``): float weights; int8 weights (exact in the activation dtype); E4M3 weights with the token
    rows already quantized to E4M3 (``x_ptr``, bytes) and their per-token scales at ``xs_ptr``; or int8 weights
    with the token rows quantized to int8 (``x_ptr``, scales at ``xs_ptr``) and int32 sums. Quantized
    weights carry fp32 per-(expert, channel) scales ``[E, I]`` (contiguous), applied to the fp32 sums (after the
    token scale) before the bias, as ``int8_weight_linear`` / ``fp8_linear`` do."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair < P
    tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    e64 = e.to(tl.int64)
    wg_base = wg_ptr + e64 * sg_e + offs_n[None, :] * sg_i
    wu_base = wu_ptr + e64 * su_e + offs_n[None, :] * su_i
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if QUANT == 3 else tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if QUANT == 3 else tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = _load_a(x_ptr + tok[:, None] * sx_t + offs_k[None, :] * sx_h, valid[:, None] & k_ok[None, :], QUANT)
        wmask = k_ok[:, None] & n_ok[None, :]
        bg = _load_w(wg_base + offs_k[:, None] * sg_h, wmask, QUANT, OUT_TY, UPCAST)
        bu = _load_w(wu_base + offs_k[:, None] * su_h, wmask, QUANT, OUT_TY, UPCAST)
        if QUANT == 0:
            a = a.to(bg.dtype)
        acc_g += _dot(a, bg, UPCAST, IEEE, QUANT)
        acc_u += _dot(a, bu, UPCAST, IEEE, QUANT)
    if QUANT >= 2:  # the reference's order: (sums * token scale) * channel scale (int32 sums rounded to fp32 first)
        x_scale = tl.load(xs_ptr + tok)[:, None]
        acc_g = acc_g.to(tl.float32) * x_scale
        acc_u = acc_u.to(tl.float32) * x_scale
    if QUANT != 0:
        acc_g = acc_g * tl.load(wsg_ptr + e64 * I + offs_n, mask=n_ok, other=0.0)[None, :]
        acc_u = acc_u * tl.load(wsu_ptr + e64 * I + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc_g += tl.load(bg_ptr + e64 * sbg_e + offs_n * sbg_i, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(bu_ptr + e64 * sbu_e + offs_n * sbu_i, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # the projections' outputs are rounded to the weight dtype first, as the reference's GEMMs are
    g = cast_rn(acc_g, OUT_TY, EMULATE_RNE).to(tl.float32)
    u = cast_rn(acc_u, OUT_TY, EMULATE_RNE).to(tl.float32)
    r = _act(g, u, ACT, alpha, limit)
    tl.store(inter_ptr + rows[:, None].to(tl.int64) * s_inter + offs_n[None, :], cast_rn(r, OUT_TY, EMULATE_RNE),
             mask=n_ok[None, :])


@triton.jit
def _down_kernel(inter_ptr, is_ptr, wd_ptr, bd_ptr, wsd_ptr, y_ptr, row_pair_ptr, tile_expert_ptr,
                 P, E, H, I, s_inter, sd_e, sd_h, sd_i, sbd_e, sbd_h, s_y,
                 HAS_BIAS: tl.constexpr, OUT_TY: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 EMULATE_RNE: tl.constexpr, QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """QUANT as in ``_gate_up_kernel``; E4M3 and W8A8 int8 experts read the intermediate rows quantized per row
    (``inter_ptr``, bytes, scales at ``is_ptr``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(row_pair_ptr + rows)
    valid = pair < P
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    e64 = e.to(tl.int64)
    w_base = wd_ptr + e64 * sd_e + offs_n[None, :] * sd_h
    a_base = inter_ptr + rows[:, None].to(tl.int64) * s_inter
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if QUANT == 3 else tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = _load_a(a_base + offs_k[None, :], k_ok[None, :], QUANT)
        b = _load_w(w_base + offs_k[:, None] * sd_i, k_ok[:, None] & n_ok[None, :], QUANT, OUT_TY, UPCAST)
        acc += _dot(a, b, UPCAST, IEEE, QUANT)
    if QUANT >= 2:
        acc = acc.to(tl.float32) * tl.load(is_ptr + rows)[:, None]
    if QUANT != 0:  # scales [E, H] (contiguous), then the bias, then one rounding, as the quantized linears do
        acc = acc * tl.load(wsd_ptr + e64 * H + offs_n, mask=n_ok, other=0.0)[None, :]
    elif HAS_BIAS:  # float experts: the projection rounded before the bias, as the reference's GEMM
        acc = cast_rn(acc, OUT_TY, EMULATE_RNE).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bd_ptr + e64 * sbd_e + offs_n * sbd_h, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * s_y + offs_n[None, :],
             cast_rn(acc, OUT_TY, EMULATE_RNE), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _combine_kernel(y_ptr, w_ptr, out_ptr, H, TOPK, s_y, s_wt, s_wk, s_out,
                    OUT_TY: tl.constexpr, EMULATE_RNE: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(0, TOPK):
        w = tl.load(w_ptr + t * s_wt + k * s_wk).to(tl.float32)
        acc += w * tl.load(y_ptr + (t * TOPK + k) * s_y + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * s_out + offs, cast_rn(acc, OUT_TY, EMULATE_RNE), mask=ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _strides(t: Optional[torch.Tensor], n: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * n


def fused_moe(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w_gate: torch.Tensor,
              w_up: torch.Tensor, w_down: torch.Tensor, b_gate: Optional[torch.Tensor] = None,
              b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None,
              activation: str = "silu", activation_args: Optional[Sequence[float]] = None,
              block_m: Optional[int] = None, block_n: int = 64, block_k: int = 64, num_warps: int = 4,
              num_stages: int = 3, scales: Optional[Sequence[torch.Tensor]] = None,
              mode: str = "int8-weight") -> torch.Tensor:
    """``moe_experts`` semantics (autodeploy/ops/moe.py) in two grouped-GEMM launches plus the combine.
    ``scales`` ``(s_gate, s_up, s_down)``: the weights are quantized, ``moe_experts_quant(mode=mode)``. For
    ``"fp8"`` one launch quantizes the token rows to E4M3 per token before the first GEMM and one the
    intermediate rows before the second (``fp8_linear``'s dynamic activation scales), and the MMAs take E4M3
    operands as stored; ``"int8"`` (W8A8) the same with int8 rows (``quantize_int8_rows``, ``int8_linear``'s
    rounding) and exact int32 sums."""
    if scales is not None:
        check_quant_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, *scales, b_gate, b_up, b_down,
                           mode)
        scales = [sc.float().contiguous() for sc in scales]
    else:
        check_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down)
    ok, why = kernel_supports(activation, hidden.dtype if scales is not None else w_gate.dtype,
                              mode if scales is not None else None)
    if not ok:
        raise MoEError(f"fused_moe: {why}")
    quant = _QUANT[mode] if scales is not None else 0
    args = list(activation_args or ())
    alpha, limit = (float(args[0]), float(args[1])) if activation == "swiglu_clamped" else (0.0, 0.0)
    if activation == "swiglu_clamped" and len(args) != 2:
        raise MoEError(f"fused_moe: swiglu_clamped takes (alpha, limit), got {args}")
    if (b_gate is None) != (b_up is None):
        raise MoEError("fused_moe: b_gate and b_up must be given together")
    T, H = hidden.shape
    K = topk_ids.shape[1]
    E, I, _ = w_gate.shape
    dtype = hidden.dtype if scales is not None else w_gate.dtype  # the projections' output dtype
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    if T == 0:
        return out
    P = T * K
    bm = block_m or block_m_for(P, E)
    row_pair, tile_expert = align_by_expert(topk_ids, E, bm)
    rows = row_pair.numel()
    inter = torch.empty((rows, I), dtype=dtype, device=hidden.device)
    y = torch.empty((P, H), dtype=dtype, device=hidden.device)
    fp32_operands = dtype == torch.float32 and quant < 2  # E4M3 / W8A8 experts multiply 8-bit operands
    upcast = _interpreting() and not fp32_operands and quant != 3  # (the interpreter's int8 dot is exact)
    ieee = fp32_operands
    tl_ty = _TL[dtype]
    has_bias = b_gate is not None
    grid1 = (rows // bm, triton.cdiv(I, block_n))
    rne1 = emulate_rne(_gate_up_kernel, dtype)
    sg, su, sd = scales if scales is not None else (hidden, hidden, hidden)
    x_in, x_scale = hidden, hidden
    wg, wu, wd = w_gate, w_up, w_down
    row_quant = quantize_fp8_rows if quant == 2 else quantize_int8_rows
    if quant >= 2:  # 8-bit token rows, one scale per token; E4M3 tensors travel as bytes (viewed as E4M3 in-kernel)
        xq, xs = row_quant(hidden)
        x_in, x_scale = xq.view(torch.uint8) if quant == 2 else xq, xs.reshape(-1).contiguous()
    if quant == 2:
        wg, wu, wd = w_gate.view(torch.uint8), w_up.view(torch.uint8), w_down.view(torch.uint8)
    _gate_up_kernel[grid1](
        x_in, x_scale, wg, wu, b_gate if has_bias else w_gate, b_up if has_bias else w_up, sg, su, inter, row_pair,
        tile_expert, P, E, K, H, I, x_in.stride(0), x_in.stride(1), *w_gate.stride(), *w_up.stride(),
        *_strides(b_gate, 2), *_strides(b_up, 2), inter.stride(0), alpha, limit,
        ACT=KERNEL_ACTIVATIONS[activation], HAS_BIAS=has_bias, OUT_TY=tl_ty, UPCAST=upcast, IEEE=ieee,
        EMULATE_RNE=rne1, QUANT=quant, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages)
    a_in, a_scale = inter, inter
    if quant >= 2:  # every row of the layout, padding included (padding rows are never stored)
        iq, i_s = row_quant(inter)
        a_in, a_scale = iq.view(torch.uint8) if quant == 2 else iq, i_s.reshape(-1).contiguous()
    grid2 = (rows // bm, triton.cdiv(H, block_n))
    _down_kernel[grid2](
        a_in, a_scale, wd, b_down if b_down is not None else w_down, sd, y, row_pair, tile_expert, P, E, H, I,
        a_in.stride(0), *w_down.stride(), *_strides(b_down, 2), y.stride(0),
        HAS_BIAS=b_down is not None, OUT_TY=tl_ty, UPCAST=upcast, IEEE=ieee, EMULATE_RNE=rne1,
        QUANT=quant, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    block_h = min(1024, triton.next_power_of_2(H))
    _combine_kernel[(T, triton.cdiv(H, block_h))](
        y, topk_weights, out, H, K, y.stride(0), topk_weights.stride(0), topk_weights.stride(1), out.stride(0),
        OUT_TY=_TL[hidden.dtype], EMULATE_RNE=emulate_rne(_combine_kernel, hidden.dtype), BLOCK_H=block_h)
    return out


_QUANT_CHECKED: dict[str, dict[str, bool]] = {mode: {} for mode in _QUANT}


def _quant_kernels_agree(device: torch.device, mode: str) -> bool:
    """The quantized experts' kernels against ``moe_quant_reference`` on a small layer, once per device and mode:
    ragged H and I against the 64-wide tiles, several tiles per expert, biases; fp32 and bf16 tokens. The
    reference runs on the CPU, where it is the plain-torch definition (on CUDA its projections dispatch to fast
    paths, e.g. ``torch._scaled_mm``, whose bf16 output would move E4M3 intermediates by a step). The bound is
    loose on purpose (float-rounding differences can move an E4M3 activation by one step), far below what a
    wrong layout, scale or conversion gives."""
    def check() -> bool:
        from autodeploy.ops import quant

        g = torch.Generator().manual_seed(0)
        T, H, I, E, K = 40, 96, 80, 4, 2
        quantize = quant.quantize_fp8_weight if mode == "fp8" else quant.quantize_int8_weight
        weights, scales = [], []
        for shape in ((E, I, H), (E, I, H), (E, H, I)):
            q, sc = quantize(torch.randn(shape[0] * shape[1], shape[2], generator=g) * 0.3)
            weights.append(q.reshape(shape))
            scales.append(sc.reshape(shape[:2]))
        biases = [torch.randn(*s, generator=g) * 0.3 for s in ((E, I), (E, I), (E, H))]
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        routing = torch.rand(T, K, generator=g)
        on = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        for dtype, bound in ((torch.float32, {"int8-weight": 1e-4, "int8": 1e-3}.get(mode, 1e-2)),
                             (torch.bfloat16, 3e-2)):
            x = torch.randn(T, H, generator=g).to(dtype)
            bs = [b.to(dtype) for b in biases]
            want = moe_quant_reference(x, ids, routing, *weights, *scales, *bs, mode=mode).float()
            got = fused_moe(x.to(device), ids.to(device), routing.to(device), *on(weights), *on(bs),
                            scales=on(scales), mode=mode).float().cpu()
            err = float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp(min=1e-30))
            if not err < bound:
                log.error("%s MoE experts on %s, %s tokens: relative RMS %.2e from the reference (bound %.0e)",
                          mode, device, dtype, err, bound)
                return False
        return True

    return kernels_agree(_QUANT_CHECKED[mode], device, f"{mode} MoE experts", "moe_experts_quant", check)


# The op the Triton backend's model pass (passes/moe_kernel.py) puts in place of ``autodeploy::moe_experts``: the
# same schema, argument by argument, so graph readers (moe_inputs, the sharding rule) see one contract.
@torch.library.custom_op("autodeploy::triton_moe_experts", mutates_args=())
def triton_moe_experts(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                       b_gate: Optional[torch.Tensor] = None, b_up: Optional[torch.Tensor] = None,
                       b_down: Optional[torch.Tensor] = None, activation: str = "silu",
                       activation_args: Optional[list[float]] = None) -> torch.Tensor:
    return fused_moe(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                     activation_args)


@triton_moe_experts.register_fake
def _triton_moe_fake(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                     activation="silu", activation_args=None):
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


# ``autodeploy::moe_experts_quant`` on the kernels (int8-weight and fp8 experts), same schema argument by argument.
@torch.library.custom_op("autodeploy::triton_moe_experts_quant", mutates_args=())
def triton_moe_experts_quant(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                             w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, s_gate: torch.Tensor,
                             s_up: torch.Tensor, s_down: torch.Tensor, b_gate: Optional[torch.Tensor] = None,
                             b_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None,
                             mode: str = "int8-weight", activation: str = "silu",
                             activation_args: Optional[list[float]] = None) -> torch.Tensor:
    if mode not in KERNEL_QUANT_MODES:
        raise MoEError(f"triton_moe_experts_quant: mode {mode!r} has no kernel (kernels run {list(KERNEL_QUANT_MODES)})")
    if not _quant_kernels_agree(hidden.device, mode):
        return moe_quant_reference(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down,
                                   b_gate, b_up, b_down, mode, activation, activation_args)
    return fused_moe(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                     activation_args, scales=(s_gate, s_up, s_down), mode=mode)


@triton_moe_experts_quant.register_fake
def _triton_moe_quant_fake(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate=None,
                           b_up=None, b_down=None, mode="int8-weight", activation="silu", activation_args=None):
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
