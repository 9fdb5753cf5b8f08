"""Triton RMSNorm and fused RoPE + paged-KV-cache-write kernels vs plain torch references.

Runs on CPU through the Triton interpreter (set before triton is imported). On a CUDA machine the
interpreter is left off so the compiled kernels are tested, including the ``gpu`` bf16 sweep.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from autodeploy.backends.triton.kernels.rms_norm import fused_add_rms_norm, rms_norm  # noqa: E402
from autodeploy.backends.triton.kernels.rope_cache import (  # noqa: E402
    cache_write,
    rope,
    rope_and_cache_write,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

# (atol, rtol) per dtype: fp32 tight, half types within a couple of ulps.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def _close(actual, expected, dtype=None):
    """Within tolerance; for fp16/bf16 results also (almost) bit-exact.

    The kernels compute in fp32 and round once, exactly like the references, so half-precision
    outputs should agree bit-for-bit except for rare rounding-boundary flips (fma contraction,
    approximate rsqrt, summation order on GPU). The exact-match rate catches semantic slips that
    stay within a 2-ulp tolerance: a missing intermediate cast, double rounding, truncation
    instead of round-to-nearest (each drops the rate to ~75%).
    """
    atol, rtol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    if actual.dtype in (torch.float16, torch.bfloat16) and actual.numel():
        rate = (actual == expected).float().mean().item()
        assert rate >= 0.95, f"only {rate:.1%} of {actual.dtype} outputs are bit-exact"


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def ref_rope(x, cos, sin):
    """fp32 rotation of the first R dims, rounded once to x's dtype; dims >= R pass through."""
    R = cos.shape[-1]
    xr = x[..., :R].float()
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    out = (xr * c + _rotate_half(xr) * s).to(x.dtype)
    return torch.cat((out, x[..., R:]), dim=-1)


def ref_rope_hf(x, cos, sin):
    """HF's apply_rotary_pos_emb numerics: everything in x's dtype."""
    R = cos.shape[-1]
    c, s = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    xr = x[..., :R]
    return torch.cat((xr * c + _rotate_half(xr) * s, x[..., R:]), dim=-1)


def ref_rms_norm(x, weight, eps):
    """HF LlamaRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


# ----------------------------------------------------------------------------------------------
# Input builders
# ----------------------------------------------------------------------------------------------

def _qkv(T, Hq, Hkv, D, dtype, fused, gen):
    """q/k/v contiguous, or strided views into one fused ``[T, (Hq+2Hkv)*D]`` projection."""
    if fused:
        qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(dtype)
        q = qkv[:, : Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D: (Hq + Hkv) * D].view(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
        assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    else:
        q = torch.randn(T, Hq, D, generator=gen).to(dtype)
        k = torch.randn(T, Hkv, D, generator=gen).to(dtype)
        v = torch.randn(T, Hkv, D, generator=gen).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


def _cos_sin(T, R, gen, dtype=torch.float32):
    """Arbitrary per-dim angles (not HF's duplicated halves) so that any half mix-up shows."""
    ang = torch.rand(T, R, generator=gen) * 6.28
    return ang.cos().to(dtype).to(DEV), ang.sin().to(dtype).to(DEV)


def _slots(T, num_pages, page_size, gen, n_pad=2):
    """Distinct slots over several pages in shuffled order, with ``n_pad`` padding (-1) entries."""
    slots = torch.randperm(num_pages * page_size, generator=gen)[:T]
    pad = torch.randperm(T, generator=gen)[:n_pad]
    slots[pad] = -1
    assert len({int(s) // page_size for s in slots if s >= 0}) > 1
    return slots.to(DEV)


def _expected_cache(cache, rows, slots):
    """Cache after writing ``rows[t]`` at ``slots[t]`` (skipping negative slots)."""
    exp = cache.clone()
    flat = exp.view(-1, *exp.shape[2:])
    keep = slots >= 0
    flat[slots[keep]] = rows[keep].to(exp.dtype)
    return exp


# ----------------------------------------------------------------------------------------------
# RoPE + cache write
# ----------------------------------------------------------------------------------------------

ROPE_CASES = [  # (D, R, Hq, Hkv, fused qkv views)
    (64, 64, 4, 2, False),
    (80, 80, 4, 1, True),    # MQA, non-power-of-2 head dim
    (96, 48, 6, 2, True),    # partial rotary, non-power-of-2
    (128, 64, 4, 4, False),  # partial rotary (R = D/2), MHA
    (128, 128, 8, 2, True),
    (256, 256, 2, 1, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,R,Hq,Hkv,fused", ROPE_CASES)
def test_rope_and_cache_write(D, R, Hq, Hkv, fused, dtype):
    gen = torch.Generator().manual_seed(D * 31 + R + Hq)
    T, num_pages, page_size = 9, 5, 4
    q, k, v = _qkv(T, Hq, Hkv, D, dtype, fused, gen)
    cos, sin = _cos_sin(T, R, gen)
    slots = _slots(T, num_pages, page_size, gen)
    # Random pre-existing cache content: rows not addressed by a valid slot must stay bit-identical.
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    k_exp = _expected_cache(k_cache, ref_rope(k, cos, sin), slots)
    v_exp = _expected_cache(v_cache, v, slots)

    q_rot = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots)

    assert q_rot.shape == (T, Hq, D) and q_rot.dtype == dtype and q_rot.is_contiguous()
    _close(q_rot, ref_rope(q, cos, sin))
    _close(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)  # v is copied bit-exactly, untouched rows included
    untouched = torch.ones(num_pages * page_size, dtype=torch.bool, device=DEV)
    untouched[slots[slots >= 0]] = False
    assert untouched.sum() == num_pages * page_size - (T - 2)
    assert torch.equal(k_cache.view(-1, Hkv, D)[untouched], k_exp.view(-1, Hkv, D)[untouched])
    # Inputs are not modified.
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("cos_in_x_dtype", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_matches_hf_numerics(dtype, cos_in_x_dtype):
    """Within a couple of half-precision ulps of HF's in-dtype formula.

    HF's rotary module hands cos/sin over already cast to the model dtype; fp32 tables work too.
    """
    gen = torch.Generator().manual_seed(7)
    T, D = 5, 128
    x = torch.randn(T, 4, D, generator=gen).to(dtype).to(DEV)
    # HF layout: cos = cat(freqs, freqs) from real positions.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(100, 100 + T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEV), emb.sin().to(DEV)
    if cos_in_x_dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    out = rope(x, cos[None], sin[None])  # HF's [1, T, R] shape is accepted too
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out, ref_rope_hf(x, cos, sin), atol=tol, rtol=tol)


@pytest.mark.parametrize("D,R", [(64, 32), (80, 80), (256, 128)])
def test_rope_single_tensor(D, R):
    gen = torch.Generator().manual_seed(D + R)
    T, H = 6, 3
    base = torch.randn(T, H + 2, D, generator=gen).to(DEV)
    x = base[:, 1: H + 1]  # strided view
    x0 = x.clone()
    cos, sin = _cos_sin(T, R, gen)
    out = rope(x, cos, sin)
    assert out.is_contiguous() and out.data_ptr() != x.data_ptr()
    _close(out, ref_rope(x, cos, sin))
    assert torch.equal(x, x0)
    if R < D:  # pass-through dims are copied exactly
        assert torch.equal(out[..., R:], x[..., R:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [80, 128])
def test_cache_write_exact(D, dtype):
    gen = torch.Generator().manual_seed(D)
    T, Hkv, num_pages, page_size = 11, 2, 4, 8
    _, k, v = _qkv(T, 1, Hkv, D, dtype, True, gen)
    slots = _slots(T, num_pages, page_size, gen, n_pad=3)
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    k_exp = _expected_cache(k_cache, k, slots)
    v_exp = _expected_cache(v_cache, v, slots)
    cache_write(k, v, k_cache, v_cache, slots.to(torch.int32))  # int32 slots work too
    assert torch.equal(k_cache, k_exp) and torch.equal(v_cache, v_exp)


def test_all_padding_and_empty():
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(3, 2, 1, 64, torch.float32, False, gen)
    cos, sin = _cos_sin(3, 64, gen)
    k_cache = torch.randn(2, 4, 1, 64, generator=gen).to(DEV)
    v_cache = torch.randn(2, 4, 1, 64, generator=gen).to(DEV)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    no_slots = torch.full((3,), -1, device=DEV)
    q_rot = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, no_slots)
    _close(q_rot, ref_rope(q, cos, sin))  # q is still rotated for padding tokens
    assert torch.equal(k_cache, kc0) and torch.equal(v_cache, vc0)
    e = rope_and_cache_write(q[:0], k[:0], v[:0], cos[:0], sin[:0], k_cache, v_cache,
                             no_slots[:0])
    assert e.shape == (0, 2, 64)
    assert torch.equal(k_cache, kc0) and torch.equal(v_cache, vc0)


def test_rope_rejects_bad_rotary_dim():
    x = torch.randn(2, 1, 64, device=DEV)
    with pytest.raises(ValueError):
        rope(x, torch.ones(2, 63, device=DEV), torch.zeros(2, 63, device=DEV))  # odd
    with pytest.raises(ValueError):
        rope(x, torch.ones(2, 128, device=DEV), torch.zeros(2, 128, device=DEV))  # R > D


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,block", [(100, None), (1000, 128), (8200, None)])
def test_rms_norm(N, block, dtype):
    """N not a power of two; (1000, 128) and 8200 (> the 8192 register block) take the loop path."""
    gen = torch.Generator().manual_seed(N)
    x = (torch.randn(2, 3, N, generator=gen) * 3).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype).to(DEV)
    x0 = x.clone()
    y = rms_norm(x, w, 1e-6, _block=block)
    assert y.shape == x.shape and y.dtype == dtype
    _close(y, ref_rms_norm(x, w, 1e-6))
    assert torch.equal(x, x0)


def test_rms_norm_weight_promotion_noncontig_and_no_weight():
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(5, 300, generator=gen).to(torch.bfloat16).to(DEV)
    x = big[:, 10:260]  # row stride 300, no copy needed
    w32 = torch.randn(250, generator=gen).to(DEV)
    y = rms_norm(x, w32, 1e-5)
    assert y.dtype == torch.float32  # weight(fp32) * h.to(bf16) promotes like torch
    _close(y, ref_rms_norm(x, w32, 1e-5), torch.bfloat16)
    y2 = rms_norm(x, None, 1e-5, _block=64)
    _close(y2, ref_rms_norm(x, None, 1e-5))
    # Large eps must matter (catches eps dropped or added after the rsqrt).
    y3 = rms_norm(x.float(), None, 10.0)
    _close(y3, ref_rms_norm(x.float(), None, 10.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,block", [(96, None), (1000, 256)])
def test_fused_add_rms_norm(N, block, dtype):
    gen = torch.Generator().manual_seed(N + 5)
    x = torch.randn(4, N, generator=gen).to(dtype).to(DEV)
    res = (torch.randn(4, N, generator=gen) * 4).to(dtype).to(DEV)
    w = torch.randn(N, generator=gen).to(dtype).to(DEV)
    x0, r0 = x.clone(), res.clone()
    y, new_res = fused_add_rms_norm(x, res, w, 1e-6, _block=block)
    r2 = x + res
    assert torch.equal(new_res, r2)  # same rounding as torch's add
    _close(y, ref_rms_norm(r2, w, 1e-6))
    # Fresh outputs; inputs untouched.
    assert torch.equal(x, x0) and torch.equal(res, r0)
    assert new_res.data_ptr() not in (x.data_ptr(), res.data_ptr())


def test_fused_add_rms_norm_mixed_dtype_residual():
    """fp32 residual stream + bf16 branch output: sum (and the norm input) is fp32, like torch."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 200, generator=gen).to(torch.bfloat16).to(DEV)
    res = torch.randn(3, 200, generator=gen).to(DEV)
    w = torch.randn(200, generator=gen).to(torch.bfloat16).to(DEV)
    y, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    r2 = x + res
    assert new_res.dtype == torch.float32 and torch.equal(new_res, r2)
    assert y.dtype == torch.float32
    _close(y, ref_rms_norm(r2, w, 1e-6), torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# GPU sweep (compiled kernels, realistic sizes)
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                    reason="needs CUDA with compiled (non-interpreted) Triton kernels")
@pytest.mark.parametrize("D,R", [(64, 64), (80, 80), (96, 48), (128, 128), (128, 64), (256, 256)])
def test_gpu_bf16_sweep(D, R):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(D + R)
    T, Hq, Hkv, num_pages, page_size = 333, 32, 8, 64, 16
    q, k, v = _qkv(T, Hq, Hkv, D, dtype, True, gen)
    cos, sin = _cos_sin(T, R, gen)
    slots = _slots(T, num_pages, page_size, gen, n_pad=17)
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=gen).to(dtype).to(DEV)
    k_exp = _expected_cache(k_cache, ref_rope(k, cos, sin), slots)
    v_exp = _expected_cache(v_cache, v, slots)
    q_rot = rope_and_cache_write(q, k, v, cos, sin, k_cache, v_cache, slots)
    _close(q_rot, ref_rope(q, cos, sin))
    _close(k_cache, k_exp)
    assert torch.equal(v_cache, v_exp)

    for N in (D * 16, 4096, 5120, 14336):  # 14336 > 8192: multi-block path
        x = torch.randn(T, N, generator=gen).to(dtype).to(DEV)
        res = torch.randn(T, N, generator=gen).to(dtype).to(DEV)
        w = torch.randn(N, generator=gen).to(dtype).to(DEV)
        _close(rms_norm(x, w, 1e-6), ref_rms_norm(x, w, 1e-6))
        y, r2 = fused_add_rms_norm(x, res, w, 1e-6)
        assert torch.equal(r2, x + res)
        _close(y, ref_rms_norm(x + res, w, 1e-6))
