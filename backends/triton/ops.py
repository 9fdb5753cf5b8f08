"""Triton-backed custom ops. Each has a fake implementation so cached graphs still trace, export and compile."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from autodeploy.backends.triton.kernels.attention import NewTokenKV, context_attention, decode_attention, new_token_mode
from autodeploy.backends.triton.kernels.gated_act import gated_act, gated_act_fp8
from autodeploy.backends.triton.kernels.gemv import gemv
from autodeploy.backends.triton.kernels.rms_norm import fused_add_rms_norm, rms_norm, rms_norm_fp8
from autodeploy.backends.triton.kernels.rope_cache import cache_write, rope_and_cache_write
from autodeploy.metadata import DEVICE_COMPOSED
from autodeploy.ops.cached import KV_SCALE_CACHES, define_cached_attention


def _paged_attention(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                     k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor,
                     page_table: Tensor, slot_mapping: Tensor, batch_info: Tensor, meta: list[Tensor], scale: float,
                     sliding_window: Optional[int], logit_softcap: Optional[float], sinks: Optional[Tensor],
                     alibi_slopes: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                     v_scale: Optional[Tensor] = None) -> Tensor:
    """Prefill/extend tokens: RoPE + cache write (one kernel), then the flash kernel. Decode tokens: one launch
    does RoPE, their cache write and split-K attention over the partition table the metadata node derived
    (``meta = [decode_work, decode_split_start]``), a second merges the splits; where many short contexts
    decode (``new_token_mode``), the RoPE + cache-write kernel takes the decode tokens too and the split kernel
    reads a complete cache. Counts are host ints, except in
    a device-composed step (see :func:`_device_composed`). ``k_scale``/``v_scale``: an FP8 KV cache's scales
    (every kernel quantizes on write and dequantizes on read)."""
    if len(meta) != 2:
        raise ValueError("triton cached attention expects meta = [decode_work, decode_split_start]")
    n_prefill, n_prefill_tok, n_decode, max_q = (int(x) for x in batch_info.tolist())
    out = torch.empty((q.shape[0], q.shape[1], v_cache.shape[-1]), dtype=q.dtype, device=q.device)
    # the kernels index the last dim densely; a lowering may hand over other layouts (copies only then)
    k, v, cos, sin = (x if x is None or x.stride(-1) == 1 else x.contiguous() for x in (k, v, cos, sin))
    kw = dict(scale=scale, sliding_window=sliding_window, logit_softcap=logit_softcap, sinks=sinks,
              alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if n_prefill == DEVICE_COMPOSED:
        return _device_composed(q, k, v, cos, sin, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table,
                                slot_mapping, meta, out, kw, scales)
    # "separate": every token (prefill ones too) is rotated and written by one launch, then both attention
    # kernels read a complete cache; "fused": prefill tokens here, decode tokens inside the split kernel.
    separate = n_decode > 0 and new_token_mode(k_cache, seq_lens_kv.shape[0], q.device) == "separate"
    q_all = _rope_and_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping.reshape(-1), **scales) if separate \
        else None
    if n_prefill:
        p = slice(0, n_prefill_tok)
        q_pre = q_all[p] if separate else _rope_and_write(
            q[p], k[p], v[p], None if cos is None else cos[p], None if sin is None else sin[p], k_cache, v_cache,
            slot_mapping[p], **scales)
        context_attention(q_pre, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, out[p],
                          num_seqs=n_prefill, max_q_len=max_q, **kw)
    if separate:
        decode_attention(q_all, k_cache, v_cache, seq_lens_kv, page_table, out, cu_seqlens_q=cu_seqlens_q,
                         partition=(meta[0], meta[1]), **kw)
    elif n_decode:
        decode_attention(q, k_cache, v_cache, seq_lens_kv, page_table, out, cu_seqlens_q=cu_seqlens_q,
                         partition=(meta[0], meta[1]), new_kv=NewTokenKV(k, v, slot_mapping.reshape(-1), cos, sin),
                         **kw)
    return out


def _rope_and_write(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor], k_cache: Tensor,
                    v_cache: Tensor, slot_mapping: Tensor, k_scale: Optional[Tensor] = None,
                    v_scale: Optional[Tensor] = None) -> Tensor:
    """Write the tokens' K/V into the cache (rotating k first when ``cos`` is given; quantized to FP8 when scales
    are given); returns q, rotated."""
    if cos is not None:
        return rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def _device_composed(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                     k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seq_lens_kv: Tensor, page_table: Tensor,
                     slot_mapping: Tensor, meta: list[Tensor], out: Tensor, kw: dict, scales: dict) -> Tensor:
    """A step whose split into prefill and decode sequences only the device knows (a CUDA graph captured per
    token bucket and replayed for other steps): every launch is sized by the tensor shapes alone. All tokens
    are rotated and written first (padding tokens carry slot -1), so the flash kernel (sequences of 2+ tokens)
    and the split-K decode kernel (1-token sequences, from the partition table) both read a complete cache.
    Rows of padding tokens are left unwritten."""
    q_rot = _rope_and_write(q, k, v, cos, sin, k_cache, v_cache, slot_mapping.reshape(-1), **scales)
    num_seqs = seq_lens_kv.shape[0]
    context_attention(q_rot, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, out, num_seqs=num_seqs,
                      skip_single=True, **kw)
    decode_attention(q_rot, k_cache, v_cache, seq_lens_kv, page_table, out, cu_seqlens_q=cu_seqlens_q,
                     partition=(meta[0], meta[1]), **kw)
    return out


# Variant parameters the kernels run (TritonBackend.capabilities); any other is refused at backend selection.
KERNEL_PARAMS = ("sliding_window", "logit_softcap", "sinks", "alibi_slopes")


def _kernel_params(params: dict) -> dict:
    extra = sorted(k for k, v in params.items() if v is not None and k not in KERNEL_PARAMS)
    if extra:
        raise NotImplementedError(f"triton cached attention does not run the variant parameters {extra}")
    return {k: params.get(k) for k in KERNEL_PARAMS}


def _cached(q, k, v, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, slot_mapping, batch_info, meta,
            scale, params, k_scale=None, v_scale=None):
    return _paged_attention(q, k, v, None, None, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table,
                            slot_mapping, batch_info, meta, scale, **_kernel_params(params), k_scale=k_scale,
                            v_scale=v_scale)


def _cached_rope(q, k, v, cos, sin, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, slot_mapping,
                 batch_info, meta, scale, params, k_scale=None, v_scale=None):
    """RoPE on q/k fused with the KV-cache write and (for decode tokens) with the attention itself."""
    return _paged_attention(q, k, v, cos, sin, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table,
                            slot_mapping, batch_info, meta, scale, **_kernel_params(params), k_scale=k_scale,
                            v_scale=v_scale)


# Both signatures are the shared cached-attention schema (autodeploy/ops/cached.py) with the FP8 KV scales; the
# RoPE form adds cos/sin.
triton_cached_attention = define_cached_attention("triton_cached_attention", _cached,
                                                  optional_caches=KV_SCALE_CACHES)
triton_cached_attention_rope = define_cached_attention("triton_cached_attention_rope", _cached_rope,
                                                       extra_inputs=("cos", "sin"), optional_caches=KV_SCALE_CACHES)


@torch.library.custom_op("autodeploy::triton_rms_norm", mutates_args=())
def triton_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm(x, weight, eps)


@triton_rms_norm.register_fake
def _fake_rms(x, weight, eps):
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


@torch.library.custom_op("autodeploy::triton_fused_add_rms_norm", mutates_args=())
def triton_fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``r = x + residual; return rms_norm(r), r`` in one pass over the row."""
    return fused_add_rms_norm(x, residual, weight, eps)


@triton_fused_add_rms_norm.register_fake
def _fake_add_rms(x, residual, weight, eps):
    r = torch.empty(torch.broadcast_shapes(x.shape, residual.shape), dtype=torch.promote_types(x.dtype, residual.dtype),
                    device=x.device)
    return torch.empty(r.shape, dtype=torch.promote_types(r.dtype, weight.dtype), device=x.device), r


@torch.library.custom_op("autodeploy::triton_rms_norm_fp8", mutates_args=())
def triton_rms_norm_fp8(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``quantize_fp8_activation(rms_norm(x))``: float8 rows and per-token scales, from the norm's launch."""
    return rms_norm_fp8(x, weight, eps)


def _fake_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Float8 rows shaped like ``x`` and their per-token fp32 scales ``[..., 1]``."""
    return torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device), x.new_empty(
        (*x.shape[:-1], 1), dtype=torch.float32)


@triton_rms_norm_fp8.register_fake
def _fake_rms_fp8(x, weight, eps):
    return _fake_fp8_rows(x)


@torch.library.custom_op("autodeploy::triton_fused_add_rms_norm_fp8", mutates_args=())
def triton_fused_add_rms_norm_fp8(x: Tensor, residual: Tensor, weight: Tensor, eps: float
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``r = x + residual``; ``quantize_fp8_activation(rms_norm(r))`` and ``r`` in one pass over the row."""
    return rms_norm_fp8(x, weight, eps, residual=residual)


@triton_fused_add_rms_norm_fp8.register_fake
def _fake_add_rms_fp8(x, residual, weight, eps):
    q, s = _fake_fp8_rows(x)
    return q, s, torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)


@torch.library.custom_op("autodeploy::triton_gated_act_fp8", mutates_args=())
def triton_gated_act_fp8(gate: Tensor, up: Tensor, act: str) -> tuple[Tensor, Tensor]:
    """``quantize_fp8_activation(act(gate) * up)`` in one launch (one program per row)."""
    return gated_act_fp8(gate, up, act)


@triton_gated_act_fp8.register_fake
def _fake_gated_fp8(gate, up, act):
    return _fake_fp8_rows(gate)


@torch.library.custom_op("autodeploy::triton_gated_act", mutates_args=())
def triton_gated_act(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """``act(gate) * up`` in one kernel (``act``: silu | gelu_tanh)."""
    return gated_act(gate, up, act)


@triton_gated_act.register_fake
def _fake_gated(gate, up, act):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("autodeploy::triton_linear", mutates_args=())
def triton_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``, except that a single row (batch-1 decode) goes to the skinny-GEMM kernel, which streams the
    weight closer to the bandwidth floor than cuBLAS at M=1 (benchmarks/bench_gemv.py)."""
    if x.numel() == x.shape[-1] and weight.stride(-1) == 1:
        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@triton_linear.register_fake
def _fake_linear(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("autodeploy::triton_linear_gated_act", mutates_args=())
def triton_linear_gated_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, gate_first: bool) -> Tensor:
    """``act(gate) * up`` of a fused gate/up linear (``weight`` stacks the two halves). A single row runs the
    skinny GEMM with the activation in its epilogue (no activation kernel, no gate/up round trip); several rows
    run ``F.linear`` and the gated-activation kernel."""
    if x.numel() == x.shape[-1] and weight.stride(-1) == 1:
        return gemv(x, weight, bias, gated=act, gate_first=gate_first)
    y = torch.nn.functional.linear(x, weight, bias)
    n = weight.shape[0] // 2
    gate, up = (y[..., :n], y[..., n:]) if gate_first else (y[..., n:], y[..., :n])
    return gated_act(gate, up, act)


@triton_linear_gated_act.register_fake
def _fake_linear_gated(x, weight, bias, act, gate_first):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))
