"""Triton paged attention kernels vs a plain-torch paged reference.

Runs on CPU through the Triton interpreter (``TRITON_INTERPRET=1`` is set before triton is imported), so
shapes are tiny. On a CUDA machine run with ``TRITON_INTERPRET=0`` to test the compiled kernels on the GPU
(this also enables the bf16 ``gpu`` sweep). Every case draws fresh random inputs from its own seed, shuffles the cache pages, and fills
unused cache slots with NaN so that any read outside the visible range poisons the result.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import importlib  # noqa: E402

import autodeploy.backends.triton.kernels.attention as attn_mod  # noqa: E402
from autodeploy.backends.triton.partition import decode_partition, target_work_items  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRET:
    import triton.language.standard as _tl_std
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_tl_std.cdiv, InterpretedFunction):
        # triton's own @jit helpers were built before TRITON_INTERPRET=1 was set; the interpreter cannot work.
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set; export TRITON_INTERPRET=1 or run this file alone",
            allow_module_level=True,
        )
    if not isinstance(attn_mod._context_attn_kernel, InterpretedFunction):
        # Another module imported the kernels before TRITON_INTERPRET was set: re-decorate them.
        attn_mod = importlib.reload(attn_mod)
context_attention = attn_mod.context_attention
decode_attention = attn_mod.decode_attention
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


# --------------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------------


def paged_attention_reference(
    q, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, *, scale, sliding_window, logit_softcap, sinks
):
    """Per-sequence fp32 attention over the paged cache, straight from docs/contracts.md."""
    _, page_size, hkv, d = k_cache.shape
    hq = q.shape[1]
    group = hq // hkv
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens_kv.tolist()
    for s in range(len(cu) - 1):
        qs, qe, kv_len = cu[s], cu[s + 1], lens[s]
        q_len = qe - qs
        if q_len == 0:
            continue
        n_pages = math.ceil(kv_len / page_size)
        pages = page_table[s, :n_pages].long()
        k = k_cache[pages].reshape(-1, hkv, d)[:kv_len].float().repeat_interleave(group, dim=1)
        v = v_cache[pages].reshape(-1, hkv, d)[:kv_len].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,lhd->htl", q[qs:qe].float(), k) * scale
        if logit_softcap is not None and logit_softcap > 0:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        pos = kv_len - q_len + torch.arange(q_len)
        j = torch.arange(kv_len)
        vis = j[None, :] <= pos[:, None]
        if sliding_window is not None and sliding_window > 0:
            vis &= (pos[:, None] - j[None, :]) < sliding_window
        scores = scores.masked_fill(~vis[None], float("-inf"))
        if sinks is not None:
            sink_col = sinks.float().view(hq, 1, 1).expand(hq, q_len, 1)
            scores = torch.cat([scores, sink_col], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        if sinks is not None:
            probs = probs[..., :-1]
        out[qs:qe] = torch.einsum("htl,lhd->thd", probs, v).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------------
# Case builder
# --------------------------------------------------------------------------------------------------------


def make_case(seqs, hq, hkv, d, page_size, dtype, seed, with_sinks=False, extra_pages=3):
    """Random paged cache for sequences given as ``(cached_len, new_len)``.

    Pages are assigned from a random permutation (non-contiguous, shuffled order); unused rows and pages
    hold NaN; page_table padding is 0 (as in the contract).
    """
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    n_pages_each = [math.ceil(L / page_size) for L in lens]
    num_pages = sum(n_pages_each) + extra_pages
    max_pages = max(n_pages_each) + 1
    k_cache = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_pages, generator=g)
    page_table = torch.zeros((len(seqs), max_pages), dtype=torch.int32)
    nxt = 0
    for s, L in enumerate(lens):
        for p in range(n_pages_each[s]):
            page = int(perm[nxt])
            nxt += 1
            page_table[s, p] = page
            rows = min(page_size, L - p * page_size)
            k_cache[page, :rows] = torch.randn(rows, hkv, d, generator=g).to(dtype)
            v_cache[page, :rows] = torch.randn(rows, hkv, d, generator=g).to(dtype)
    q_lens = [n for _, n in seqs]
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g).to(dtype)
    sinks = (torch.randn(hq, generator=g) * 2.0).float() if with_sinks else None
    t = lambda x: x.to(DEVICE) if x is not None else None  # noqa: E731
    return dict(
        q=t(q), k_cache=t(k_cache), v_cache=t(v_cache), cu_seqlens_q=t(cu),
        seq_lens_kv=t(torch.tensor(lens, dtype=torch.int32)), page_table=t(page_table), sinks=t(sinks),
        max_q_len=max(q_lens),
    )  # fmt: skip


def _ref(c, **kw):
    return paged_attention_reference(
        c["q"].cpu(), c["k_cache"].cpu(), c["v_cache"].cpu(), c["cu_seqlens_q"].cpu(), c["seq_lens_kv"].cpu(),
        c["page_table"].cpu(), sinks=None if c["sinks"] is None else c["sinks"].cpu(), **kw,
    )  # fmt: skip


def _check(out, ref, dtype):
    rtol, atol = TOL[dtype]
    assert not torch.isnan(out).any(), "NaN in kernel output (read outside the visible range?)"
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=rtol, atol=atol)


def run_context(seqs, hq=4, hkv=2, d=64, page_size=16, dtype=torch.float32, seed=0, window=None, softcap=None,
                sinks=False):  # fmt: skip
    """Both grids: one per sequence (``max_q_len``) and the flat one of device-composed steps (sized by the token
    and sequence counts, each program looks its sequence up)."""
    c = make_case(seqs, hq, hkv, d, page_size, dtype, seed, with_sinks=sinks)
    scale = d**-0.5
    ref = _ref(c, scale=scale, sliding_window=window, logit_softcap=softcap)
    for max_q_len in (c["max_q_len"], None):
        out = torch.full_like(c["q"], float("nan"))
        context_attention(
            c["q"], c["k_cache"], c["v_cache"], c["cu_seqlens_q"], c["seq_lens_kv"], c["page_table"], out,
            num_seqs=len(seqs), max_q_len=max_q_len, scale=scale, sliding_window=window,
            logit_softcap=softcap, sinks=c["sinks"],
        )  # fmt: skip
        _check(out, ref, dtype)


def run_decode(lens, hq=4, hkv=2, d=64, page_size=16, dtype=torch.float32, seed=0, window=None, softcap=None,
               sinks=False, target=None, align=16, prefill=()):  # fmt: skip
    """Decode rows of ``lens`` (KV length incl. the new token), optionally behind ``prefill`` sequences
    ``(cached, new)`` that the decode kernel must leave untouched. ``target``/``align`` shape the partition
    (small chunks on tiny shapes so sequences really are split); None = the SM-based default."""
    seqs = list(prefill) + [(L - 1, 1) for L in lens]
    c = make_case(seqs, hq, hkv, d, page_size, dtype, seed, with_sinks=sinks)
    scale = d**-0.5
    out = torch.full_like(c["q"], float("nan"))
    if target is None:
        target = target_work_items(hkv, attn_mod.device_sms(c["q"].device))
    part = decode_partition(c["seq_lens_kv"], c["cu_seqlens_q"], target=target, window=window or 0, align=align)
    decode_attention(
        c["q"], c["k_cache"], c["v_cache"], c["seq_lens_kv"], c["page_table"], out,
        scale=scale, sliding_window=window, logit_softcap=softcap, sinks=c["sinks"],
        cu_seqlens_q=c["cu_seqlens_q"], partition=part,
    )  # fmt: skip
    ref = _ref(c, scale=scale, sliding_window=window, logit_softcap=softcap)
    n_prefill_tok = sum(n for _, n in prefill)
    assert torch.isnan(out[:n_prefill_tok]).all(), "decode kernel wrote into prefill rows"
    _check(out[n_prefill_tok:], ref[n_prefill_tok:], dtype)


def _rope_ref(x, cos, sin):
    """HF rotate_half RoPE over the first R dims, computed in fp32 and rounded once (as the kernels do)."""
    r = cos.shape[-1]
    xf = x.float()
    rot, rest = xf[..., :r], xf[..., r:]
    half = torch.cat((-rot[..., r // 2:], rot[..., : r // 2]), dim=-1)
    return torch.cat((rot * cos[:, None].float() + half * sin[:, None].float(), rest), dim=-1).to(x.dtype)


def run_decode_new_kv(lens, hq=4, hkv=2, d=64, page_size=16, dtype=torch.float32, seed=0, window=None,
                      softcap=None, sinks=False, target=3, align=16, prefill=(), rot=None, pad_rows=0):
    """Fused decode: the new token's K/V are NOT in the cache (its row holds NaN); the launch rotates q/k
    (``rot`` rotary dims; None = no RoPE), writes K/V at ``slot_mapping`` and attends. Checks the output against
    the reference on the updated cache and the cache rows written.
    ``pad_rows`` decode rows get slot -1 (padding): nothing may be written for them."""
    seqs = list(prefill) + [(L - 1, 1) for L in lens]
    c = make_case(seqs, hq, hkv, d, page_size, dtype, seed, with_sinks=sinks)
    g = torch.Generator().manual_seed(seed + 1000)
    T = c["q"].shape[0]
    kv_lens = c["seq_lens_kv"].cpu().tolist()
    cu = c["cu_seqlens_q"].cpu().tolist()
    pt = c["page_table"].cpu()
    slots = torch.full((T,), -1, dtype=torch.int64)
    for s in range(len(prefill), len(seqs)):
        p = kv_lens[s] - 1
        slots[cu[s]] = int(pt[s, p // page_size]) * page_size + p % page_size
    n_real = len(seqs) - pad_rows
    slots[cu[n_real]:] = -1
    # a wider projection (fused qkv) whose slices are the strided k/v the kernel must read
    kv_wide = torch.randn(T, 2 * hkv + 1, d, generator=g).to(dtype)
    k_new, v_new = kv_wide[:, :hkv], kv_wide[:, hkv + 1:]
    cos = sin = None
    q_ref = c["q"].cpu()
    k_ref = k_new
    if rot is not None:
        theta = torch.rand(T, rot // 2, generator=g) * 6.0
        cos, sin = torch.cat([theta.cos()] * 2, -1).to(dtype), torch.cat([theta.sin()] * 2, -1).to(dtype)
        q_ref, k_ref = _rope_ref(q_ref, cos, sin), _rope_ref(k_new, cos, sin)
    k_cache_ref, v_cache_ref = c["k_cache"].cpu().clone(), c["v_cache"].cpu().clone()
    flat = lambda x: x.view(-1, hkv, d)  # noqa: E731
    for t in range(T):
        if slots[t] >= 0:
            flat(c["k_cache"])[slots[t]] = float("nan")  # the kernel must not read the new row from the cache
            flat(c["v_cache"])[slots[t]] = float("nan")
            flat(k_cache_ref)[slots[t]] = k_ref[t]
            flat(v_cache_ref)[slots[t]] = v_new[t]
    scale = d**-0.5
    out = torch.full_like(c["q"], float("nan"))
    if target is None:
        target = target_work_items(hkv, attn_mod.device_sms(c["q"].device))
    part = decode_partition(c["seq_lens_kv"], c["cu_seqlens_q"], target=target, window=window or 0, align=align)
    t_ = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    new_kv = attn_mod.NewTokenKV(t_(k_new), t_(v_new), t_(slots), t_(cos), t_(sin))
    decode_attention(
        c["q"], c["k_cache"], c["v_cache"], c["seq_lens_kv"], c["page_table"], out,
        scale=scale, sliding_window=window, logit_softcap=softcap, sinks=c["sinks"],
        cu_seqlens_q=c["cu_seqlens_q"], partition=part, new_kv=new_kv,
    )  # fmt: skip
    n_pre = sum(n for _, n in prefill)
    written = slots >= 0
    # v is copied bit-exactly; rotated k within rounding (fma contraction on the GPU), mostly bit-exact
    torch.testing.assert_close(flat(c["v_cache"]).cpu()[slots[written]], flat(v_cache_ref)[slots[written]],
                               rtol=0, atol=0)
    k_got, k_want = flat(c["k_cache"]).cpu()[slots[written]], flat(k_cache_ref)[slots[written]]
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(k_got, k_want, rtol=tol, atol=tol)
    if dtype != torch.float32:  # one rounding to the storage dtype: (almost) always the reference's
        assert (k_got == k_want).float().mean() > 0.95
    ref = paged_attention_reference(
        q_ref, k_cache_ref, v_cache_ref, c["cu_seqlens_q"].cpu(), c["seq_lens_kv"].cpu(), pt,
        scale=scale, sliding_window=window, logit_softcap=softcap,
        sinks=None if c["sinks"] is None else c["sinks"].cpu(),
    )  # fmt: skip
    assert torch.isnan(out[:n_pre]).all(), "decode kernel wrote into prefill rows"
    real = slice(n_pre, cu[n_real])
    _check(out[real], ref[real], dtype)
    return out


# --------------------------------------------------------------------------------------------------------
# Context attention
# --------------------------------------------------------------------------------------------------------

# (cached, new): fresh prefill, extend crossing page boundaries, single token, long-ish prefill.
MIXED = [(0, 7), (21, 5), (3, 1), (0, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_context_mixed(dtype):
    run_context(MIXED, dtype=dtype, seed=1)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2), (4, 1), (6, 2)])
def test_context_gqa_mqa(hq, hkv):
    run_context([(5, 9), (0, 12)], hq=hq, hkv=hkv, seed=10 + hq * 7 + hkv)


@pytest.mark.parametrize("d", [80, 96, 128, 256])
def test_context_head_dims(d):
    run_context([(9, 6), (0, 11)], d=d, dtype=torch.float16, seed=20 + d)


@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_context_page_sizes(page_size):
    run_context([(37, 4), (0, 19), (70, 1)], page_size=page_size, seed=30 + page_size)


@pytest.mark.parametrize("window", [1, 5, 16, 33])
def test_context_sliding_window(window):
    # long cached prefix + several new tokens: exercises the masked window-edge phase and the tile skip.
    run_context([(60, 12), (0, 45), (7, 3)], window=window, seed=40 + window)


def test_context_window_tile_edge():
    # key 32 (a tile start with BLOCK_N=32) is exactly outside the last row's window (75 - 32 == 43):
    # the "fully inside the window" tile test must not treat that tile as unmasked.
    run_context([(70, 6), (0, 76)], window=43, seed=45)


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (64, 32), (16, 16)])
def test_gpu_tile_sizes_under_interpreter(monkeypatch, block_m, block_n):
    """The GPU tile configs (bigger than the interpreter's default) are exercised on CPU too."""
    monkeypatch.setattr(attn_mod, "_context_config", lambda *a: (block_m, block_n, 4, 1))
    monkeypatch.setattr(attn_mod, "_decode_config", lambda *a: (block_n, 4, 1))
    run_context([(70, 6), (130, 9), (0, 70)], hq=8, hkv=2, window=43, sinks=True, seed=46 + block_n)
    run_context([(100, 21)], hq=8, hkv=1, dtype=torch.float16, seed=47 + block_n)
    # decode: the gathered path takes BLOCK_N from the config; page tiles take the page size instead
    monkeypatch.setattr(attn_mod, "DECODE_PAGE_TILES", False)
    run_decode([1, 64, 200], hq=8, hkv=2, target=3, align=block_n, window=100, sinks=True, seed=48 + block_n)
    monkeypatch.setattr(attn_mod, "DECODE_PAGE_TILES", True)
    run_decode([1, 64, 200], hq=8, hkv=2, page_size=block_n, target=3, align=block_n, window=100, sinks=True,
               seed=49 + block_n)


def test_context_softcap_sinks():
    run_context(MIXED, softcap=5.0, sinks=True, seed=50)
    run_context([(30, 9), (0, 4)], hq=8, hkv=2, softcap=2.0, sinks=True, window=7, dtype=torch.float16, seed=51)


def test_context_zero_tokens_sequence():
    # a sequence with no new tokens this step must not write anything or break its neighbours
    run_context([(10, 3), (6, 0), (0, 5)], seed=60)


@pytest.mark.parametrize("block_m", [16, 32])
def test_context_many_sequences(monkeypatch, block_m):
    """Dozens of sequences of 0-9 new tokens: the flat grid's per-program binary search over the sequences'
    first tiles (empty sequences, tiles straddling sequence starts) places every row."""
    monkeypatch.setattr(attn_mod, "_context_config", lambda *a: (block_m, 16, 4, 1))
    rng = torch.Generator().manual_seed(70 + block_m)
    seqs = [(int(torch.randint(0, 40, (1,), generator=rng)), int(torch.randint(0, 10, (1,), generator=rng)))
            for _ in range(37)]
    run_context(seqs, hq=8, hkv=2, seed=71 + block_m)


def test_context_skip_single_leaves_decodes():
    """Device-composed steps: the flat grid skips one-token (decode) and empty sequences; the others match."""
    seqs = [(10, 3), (6, 1), (0, 5), (4, 0), (9, 1), (0, 2)]
    c = make_case(seqs, 4, 2, 64, 16, torch.float32, 61)
    out = torch.full_like(c["q"], float("nan"))
    context_attention(c["q"], c["k_cache"], c["v_cache"], c["cu_seqlens_q"], c["seq_lens_kv"], c["page_table"],
                      out, num_seqs=len(seqs), scale=0.125, sliding_window=None, logit_softcap=None, sinks=None,
                      skip_single=True)  # fmt: skip
    ref = _ref(c, scale=0.125, sliding_window=None, logit_softcap=None)
    cu = c["cu_seqlens_q"].tolist()
    multi = torch.tensor([i for s, (_, n) in enumerate(seqs) if n > 1 for i in range(cu[s], cu[s + 1])])
    single = [cu[s] for s, (_, n) in enumerate(seqs) if n == 1]
    _check(out[multi], ref[multi], torch.float32)
    assert torch.isnan(out[single].cpu()).all()


# --------------------------------------------------------------------------------------------------------
# Decode attention
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["reduce", "ticket"])
def merge_mode(request, monkeypatch):
    """Both ways a sequence's splits are merged: the reduction kernel, or the last split program by ticket."""
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", [1, 3, None])
def test_decode_mixed(dtype, target):
    run_decode([1, 17, 75, 140], dtype=dtype, target=target, seed=100 + (target or 0))


def test_merge_in_kernel_rule(monkeypatch):
    """The reduction kernel merges unless the launch is a short-context one or the ticket merge is asked for;
    the override wins either way; an unknown mode is refused by name."""
    monkeypatch.delenv("AUTODEPLOY_DECODE_MERGE", raising=False)
    assert not attn_mod.merge_in_kernel()
    assert attn_mod.merge_in_kernel(short=True)
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", "reduce")
    assert not attn_mod.merge_in_kernel(short=True)
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", "reduce")
    assert not attn_mod.merge_in_kernel()
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", "ticket")
    assert attn_mod.merge_in_kernel()
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", "split")
    with pytest.raises(ValueError, match="AUTODEPLOY_DECODE_MERGE"):
        attn_mod.merge_in_kernel()


def test_decode_config_rule(monkeypatch):
    """Short contexts over many programs take 2-warp programs; long contexts, few programs, fp32 and the tuning
    override keep theirs (the rule as a GPU launch sees it)."""
    monkeypatch.setattr(attn_mod, "_interpreting", lambda: False)
    monkeypatch.setattr(attn_mod, "_max_shared_mem", lambda i: 228 * 1024)
    monkeypatch.delenv("AUTODEPLOY_DECODE_CONFIG", raising=False)
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    deep = attn_mod._DEEP_STAGES
    assert attn_mod._decode_config(128, bf16, cuda, 448, 62.0) == (64, 2, 3)  # 1,024 seqs in a CB cache
    assert attn_mod._decode_config(128, bf16, cuda, 448, 62.0, kv_fp8=True) == (64, 2, deep)
    assert attn_mod._decode_config(128, bf16, cuda, attn_mod.SHORT_CONTEXT_KEYS + 1, 62.0) == (64, 4, deep)
    assert attn_mod._decode_config(128, bf16, cuda, 448, 0.06) == (64, 4, deep)  # batch 1: few programs
    assert attn_mod._decode_config(128, bf16, cuda) == (64, 4, deep)
    assert attn_mod._decode_config(128, torch.float32, cuda, 448, 62.0) == (32, 4, 2)
    monkeypatch.setenv("AUTODEPLOY_DECODE_CONFIG", "64,4,3")
    assert attn_mod._decode_config(128, bf16, cuda, 448, 62.0) == (64, 4, 3)


def test_split_merge_leaves_tickets_zero(monkeypatch):
    """The ticket merge: repeated launches (layers) over sequences with many splits, idle items and one-split
    sequences all match, and every ticket is back at zero after each launch (the next launch counts from 0)."""
    monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", "ticket")
    for seed in (170, 171):
        run_decode([1, 9, 40, 200], sinks=seed == 171, target=12, align=8, seed=seed)
        assert int(attn_mod._tickets(torch.device(DEVICE), 1).abs().sum()) == 0
    # the production launch: RoPE, the new token's write, padding rows, a prefill sequence, bf16
    run_decode_new_kv([2, 31, 64, 150], rot=64, target=6, window=40, softcap=3.0, sinks=True, prefill=[(3, 4)],
                      pad_rows=1, dtype=torch.bfloat16, seed=172)
    assert int(attn_mod._tickets(torch.device(DEVICE), 1).abs().sum()) == 0


@pytest.fixture(params=["page-tiles", "gather"])
def decode_strategy(request, monkeypatch):
    """Both ways the decode kernel reads K/V: whole pages as tiles, or keys gathered one by one (the path for
    page sizes the page tiles do not take)."""
    monkeypatch.setattr(attn_mod, "DECODE_PAGE_TILES", request.param != "gather")
    return request.param


@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_decode_strategies(decode_strategy, page_size):
    """Window edges inside pages, one-tile and many-tile splits, sinks, mixed batch; old cache and new token."""
    run_decode([1, 17, 75, 140], page_size=page_size, target=6, window=50, sinks=True, prefill=[(0, 5)],
               seed=300 + page_size)
    run_decode_new_kv([2, 31, 64, 150], page_size=page_size, rot=64, target=6, window=40, softcap=3.0, sinks=True,
                      prefill=[(3, 4)], pad_rows=1, seed=310 + page_size)


def test_decode_behind_prefill():
    """In a mixed batch the decode kernel finds its rows through cu_seqlens_q and skips prefill sequences."""
    run_decode([40, 1, 130], prefill=[(0, 5), (20, 7)], target=4, sinks=True, seed=105)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2), (8, 1), (6, 2)])
def test_decode_gqa_mqa(hq, hkv):
    run_decode([33, 90], hq=hq, hkv=hkv, target=4, seed=110 + hq * 7 + hkv)


@pytest.mark.parametrize("d", [80, 96, 128, 256])
def test_decode_head_dims(d):
    run_decode([20, 70], d=d, dtype=torch.float16, target=4, seed=120 + d)


@pytest.mark.parametrize("page_size", [8, 16, 32])
def test_decode_page_sizes(page_size):
    run_decode([5, 64, 129], page_size=page_size, target=6, seed=130 + page_size)


@pytest.mark.parametrize("window,target", [(1, 1), (7, 2), (40, 3), (200, 2)])
def test_decode_sliding_window(window, target):
    run_decode([3, 50, 150], window=window, target=target, seed=140 + window)


@pytest.mark.parametrize("target", [1, 8])
def test_decode_softcap_sinks(target, merge_mode):
    run_decode([2, 45, 100], softcap=4.0, sinks=True, target=target, seed=150 + target)


def run_decode_fp8(lens, dtype, page_size, target, align, seed=0):
    """The split kernel on an E4M3 cache (per-row scales) against attention over the dequantized cache. Unused
    rows hold NaN, so their scales are NaN too: a masked key's scale must never reach a score or a weight."""
    from autodeploy.ops.kv_quant import dequantize_kv, quantize_kv

    c = make_case([(L - 1, 1) for L in lens], 8, 2, 64, page_size, dtype, seed)
    (k8, ks), (v8, vs) = quantize_kv(c["k_cache"]), quantize_kv(c["v_cache"])
    ref_case = dict(c, k_cache=dequantize_kv(k8, ks, dtype), v_cache=dequantize_kv(v8, vs, dtype))
    out = torch.full_like(c["q"], float("nan"))
    part = decode_partition(c["seq_lens_kv"], c["cu_seqlens_q"], target=target, align=align)
    decode_attention(c["q"], k8, v8, c["seq_lens_kv"], c["page_table"], out, scale=64**-0.5, sliding_window=None,
                     logit_softcap=None, sinks=None, cu_seqlens_q=c["cu_seqlens_q"], partition=part, k_scale=ks,
                     v_scale=vs)  # fmt: skip
    _check(out, _ref(ref_case, scale=64**-0.5, sliding_window=None, logit_softcap=None), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_fp8_cache_page_ranges(dtype, page_size, merge_mode):
    """Whole-page loop with its scales loaded a page ahead: ranges of no, one, two and many whole pages, splits
    that start and end inside a page (align 8 < page), ranges inside one page."""
    lens = [1, 5, page_size, page_size + 1, 2 * page_size, 2 * page_size + 3, 3 * page_size, 7 * page_size + 5, 300]
    run_decode_fp8(lens, dtype, page_size, target=target_work_items(2, attn_mod.device_sms(torch.device(DEVICE))),
                   align=page_size)
    run_decode_fp8(lens, dtype, page_size, target=3 * len(lens), align=8, seed=1)


def test_decode_many_splits(merge_mode):
    # more work items than tiles: one-tile splits (and idle items) must merge correctly, sinks included
    run_decode([1, 9, 40], sinks=True, target=16, align=8, seed=160)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 2)])
def test_decode_reduce_several_heads_per_program(monkeypatch, hq, hkv):
    """Many sequences: the reduction merges several query heads per program (6 heads: a ragged last program),
    sinks included, and sequences with one split (written by the split kernel) are left alone."""
    monkeypatch.setattr(attn_mod, "REDUCE_CTAS_PER_SM", 0.01)
    assert attn_mod.reduce_heads(4, hq, 8) == 8  # one program per sequence (the output starts as NaN)
    run_decode([1, 9, 40, 70, 3], hq=hq, hkv=hkv, sinks=True, target=8, align=8, seed=165 + hq)


def test_reduce_heads():
    """One head per program until there are more programs than REDUCE_CTAS_PER_SM per SM, then doubled, at most 8
    (the last program of a sequence masks heads past Hq)."""
    assert attn_mod.reduce_heads(1, 32, 132) == 1
    assert attn_mod.reduce_heads(16, 32, 132) == 1  # 512 programs
    assert attn_mod.reduce_heads(32, 32, 132) == 2
    assert attn_mod.reduce_heads(256, 32, 132) == 8
    assert attn_mod.reduce_heads(4096, 4, 132) == 4


def test_decode_matches_context():
    """decode_attention == context_attention on a batch of 1-token steps (same cache)."""
    c = make_case([(30, 1), (0, 1), (64, 1)], 8, 2, 64, 16, torch.float32, seed=170, with_sinks=True)
    kw = dict(scale=0.125, sliding_window=20, logit_softcap=3.0, sinks=c["sinks"])
    o_dec = torch.empty_like(c["q"])
    o_ctx = torch.empty_like(c["q"])
    decode_attention(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_kv"], c["page_table"], o_dec, target=2,
                     **kw)  # fmt: skip
    context_attention(c["q"], c["k_cache"], c["v_cache"], c["cu_seqlens_q"], c["seq_lens_kv"], c["page_table"],
                      o_ctx, num_seqs=3, max_q_len=1, **kw)  # fmt: skip
    torch.testing.assert_close(o_dec, o_ctx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rot", [None, 64, 32])
def test_decode_new_kv_rope(dtype, rot):
    """RoPE (full and partial rotary) + cache write + attention in one launch == rope, write, then attend."""
    run_decode_new_kv([1, 17, 64, 65, 140], dtype=dtype, rot=rot, target=5, seed=200 + (rot or 0))


@pytest.mark.parametrize("window,softcap,sinks", [(7, None, False), (40, 4.0, True), (None, 3.0, True)])
def test_decode_new_kv_features(window, softcap, sinks):
    run_decode_new_kv([2, 33, 100, 150], hq=8, hkv=2, rot=64, window=window, softcap=softcap, sinks=sinks,
                      target=4, prefill=[(0, 5), (20, 3)], seed=210 + (window or 0))


@pytest.mark.parametrize("target", [1, 2, 16])
def test_decode_new_kv_splits_and_padding(target):
    """One split, a few, and one-tile splits with idle items; padding rows (slot -1) write nothing."""
    run_decode_new_kv([1, 9, 47, 129], hq=6, hkv=2, d=80, rot=80, target=target, align=8, pad_rows=1,
                      sinks=True, seed=220 + target)


@pytest.fixture
def blocks(monkeypatch):
    """The block decode kernel forced (``AUTODEPLOY_DECODE_KERNEL=blocks``); the grids it was launched with."""
    monkeypatch.setenv("AUTODEPLOY_DECODE_KERNEL", "blocks")
    launches, kernel = [], attn_mod._decode_blocks_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(attn_mod, "_decode_blocks_kernel", Counted())
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_decode_blocks_kernel(blocks, dtype, page_size, merge_mode):
    """The block kernel (each warp owning key blocks, one merge at the end): ranges that start and end inside
    blocks and pages, whole iterations, one-block splits and idle items, windows, softcap, sinks, a mixed batch."""
    run_decode([1, 17, 75, 140, 2 * page_size], page_size=page_size, dtype=dtype, target=6, window=50, sinks=True,
               prefill=[(0, 5)], seed=400 + page_size)
    run_decode([1, 9, 40, 200], page_size=page_size, dtype=dtype, softcap=3.0, target=12, align=8,
               seed=410 + page_size)
    assert len(blocks) == 2


@pytest.mark.parametrize("hq,hkv,d", [(6, 2, 80), (8, 1, 128), (2, 2, 96)])
def test_decode_blocks_kernel_shapes(blocks, hq, hkv, d):
    """GQA groups that pad the M rows, MQA, head dims below the power of two (the D mask)."""
    run_decode([3, 50, 150], hq=hq, hkv=hkv, d=d, dtype=torch.float16, target=5, seed=420 + d)
    assert len(blocks) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_blocks_kernel_fp8(blocks, dtype, page_size, merge_mode):
    """The block kernel over an E4M3 cache (the accumulator's V-scale unit carried per row and block), with the
    NaN-filled unused rows that masked scales must keep out."""
    lens = [1, 5, page_size, page_size + 1, 2 * page_size + 3, 7 * page_size + 5, 300]
    run_decode_fp8(lens, dtype, page_size, target=3 * len(lens), align=8, seed=430)
    run_decode_fp8(lens, dtype, page_size, target=len(lens), align=page_size, seed=431)
    assert len(blocks) == 2


def test_decode_blocks_kernel_alibi(monkeypatch):
    """ALiBi biases: the block kernel against the tiled one on the same inputs (both over a complete cache)."""
    c = make_case([(40, 1), (130, 1), (0, 1)], 8, 2, 64, 16, torch.float32, seed=440, with_sinks=True)
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(8)])
    outs = {}
    for kernel in ("tiles", "blocks"):
        monkeypatch.setenv("AUTODEPLOY_DECODE_KERNEL", kernel)
        outs[kernel] = torch.full_like(c["q"], float("nan"))
        decode_attention(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_kv"], c["page_table"], outs[kernel],
                         scale=0.125, sliding_window=None, logit_softcap=None, sinks=c["sinks"], target=4,
                         alibi_slopes=slopes)  # fmt: skip
    torch.testing.assert_close(outs["blocks"], outs["tiles"], rtol=1e-5, atol=1e-5)


def test_blocks_kernel_rule(monkeypatch):
    """The tiled kernel unless the override asks for the block kernel (it is not yet measured on a GPU); pages
    that do not hold whole 16-key blocks and head dims above 128 keep the tiled kernel; a bad value is named."""
    monkeypatch.delenv("AUTODEPLOY_DECODE_KERNEL", raising=False)
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    fp8 = torch.empty(4, 64, 8, 128, dtype=torch.float8_e4m3fn)
    monkeypatch.setattr(attn_mod, "_interpreting", lambda: False)
    assert not attn_mod.blocks_kernel(fp8, bf16, cuda)
    monkeypatch.setenv("AUTODEPLOY_DECODE_KERNEL", "blocks")
    assert attn_mod.blocks_kernel(fp8, bf16, cuda)
    assert attn_mod.blocks_kernel(torch.empty(4, 64, 8, 128), torch.float32, torch.device("cpu"))
    assert not attn_mod.blocks_kernel(torch.empty(4, 8, 8, 128), bf16, cuda)  # page 8
    assert not attn_mod.blocks_kernel(torch.empty(4, 64, 8, 256), bf16, cuda)
    monkeypatch.setenv("AUTODEPLOY_DECODE_KERNEL", "tiles")
    assert not attn_mod.blocks_kernel(fp8, bf16, cuda)
    monkeypatch.setenv("AUTODEPLOY_DECODE_KERNEL", "warps")
    with pytest.raises(ValueError, match="AUTODEPLOY_DECODE_KERNEL"):
        attn_mod.blocks_kernel(fp8, bf16, cuda)


def _partition_ranges(work, split_start):
    ranges = {}
    for seq, lo, hi in work.tolist():
        if seq >= 0:
            ranges.setdefault(seq, []).append((lo, hi))
    return ranges


@pytest.mark.parametrize("seed", range(6))
def test_decode_partition_covers_visible_keys(seed):
    """Every decode sequence's visible keys are tiled exactly once by its items, in its split_start rows;
    prefill sequences get none; items never exceed the static bound; chunk sizes are aligned."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 12, (1,), generator=g))
    kv = torch.randint(1, 5000, (n,), generator=g)
    q_lens = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(2, 50, (n,), generator=g), 1)
    kv = torch.maximum(kv, q_lens)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = q_lens.cumsum(0)
    window = [0, 300][seed % 2]
    target = [1, 7, 33][seed % 3]
    work, start = decode_partition(kv.int(), cu, target=target, window=window)
    assert work.shape == (target + n, 3) and start.shape == (n + 1,)
    ranges = _partition_ranges(work, start)
    for s in range(n):
        items = list(range(int(start[s]), int(start[s + 1])))
        if q_lens[s] != 1:
            assert not items and s not in ranges
            continue
        assert [tuple(work[i, 1:].tolist()) for i in items] == ranges[s]
        lo = max(0, int(kv[s]) - window) if window else 0
        cover = sorted(ranges[s])
        assert cover[0][0] == lo and cover[-1][1] == int(kv[s])
        assert all(a[1] == b[0] for a, b in zip(cover, cover[1:])), "gap or overlap"
        assert all(hi > lo_ for lo_, hi in cover)
        assert all((hi - lo_) % 64 == 0 for lo_, hi in cover[:-1])


@pytest.mark.parametrize("seed", range(8))
def test_decode_partition_kernel_equals_torch(seed):
    """The one-kernel partition equals the torch derivation exactly: mixed prefill/decode batches, windows,
    min_chunk, batches wider than one comparison tile (several programs), and one-sequence batches."""
    from autodeploy.backends.triton.kernels.decode_partition import decode_partition_kernel

    g = torch.Generator().manual_seed(seed)
    n = [1, 3, 17, 300][seed % 4]
    kv = torch.randint(1, 9000, (n,), generator=g)
    q_lens = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(2, 50, (n,), generator=g), 1)
    if seed == 5:
        q_lens[:] = 7  # no decode at all
    kv = torch.maximum(kv, q_lens)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = q_lens.cumsum(0)
    kwargs = dict(target=[1, 7, 33, 17][seed % 4], window=[0, 300][seed % 2], align=64, min_chunk=[0, 128][seed % 2])
    want = decode_partition(kv.int(), cu, **kwargs)
    got = decode_partition_kernel(kv.int().to(DEVICE), cu.to(DEVICE), **kwargs)
    for w, o in zip(want, got):
        assert o.dtype == w.dtype and torch.equal(o.cpu(), w)


def test_decode_partition_balances_long_and_short():
    """A 32k sequence gets many splits, 100-token neighbours one each; an all-long batch of 64 needs none."""
    kv = torch.tensor([32768] + [100] * 15, dtype=torch.int32)
    work, start = decode_partition(kv, torch.arange(17, dtype=torch.int32), target=target_work_items(8, 132))
    counts = (start[1:] - start[:-1]).tolist()
    assert counts[0] >= 20 and counts[1:] == [1] * 15
    kv = torch.full((64,), 32768, dtype=torch.int32)
    work, start = decode_partition(kv, torch.arange(65, dtype=torch.int32), target=target_work_items(8, 132))
    assert (start[1:] - start[:-1]).max() <= 2


# --------------------------------------------------------------------------------------------------------
# GPU-only sweep (native bf16 dots)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_gpu_bf16_sweep(d, page_size):
    seqs = [(0, 300), (517, 33), (1000, 1), (64, 129)]
    for hq, hkv in [(32, 8), (8, 1), (4, 4)]:
        for window, softcap, sinks in [(None, None, False), (128, 30.0, True)]:
            run_context(seqs, hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=torch.bfloat16, seed=d + page_size,
                        window=window, softcap=softcap, sinks=sinks)  # fmt: skip
            run_decode([1, 300, 2049, 5000], hq=hq, hkv=hkv, d=d, page_size=page_size, dtype=torch.bfloat16,
                       seed=d + page_size + 1, window=window, softcap=softcap, sinks=sinks)  # fmt: skip
            # the production launch: RoPE + new-token cache write + attention + merge, default partition
            run_decode_new_kv([1, 300, 2049, 5000, 64], hq=hq, hkv=hkv, d=d, page_size=page_size,
                              dtype=torch.bfloat16, seed=d + page_size + 2, window=window, softcap=softcap,
                              sinks=sinks, rot=d, target=None, align=64, prefill=[(0, 7)])  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0")
def test_gpu_short_context_config(monkeypatch):
    """Many short sequences in a cache sized for them: the short-context launches match the reference. The one
    the op runs (the cache already holds the new token, splits merged by ticket): 2 warps and 3 stages over bf16
    pages, 2 warps and 5 stages over FP8 ones; and the fused launch (forced by AUTODEPLOY_DECODE_NEW_TOKEN) with
    the new token's write checked too."""
    chosen, merged = [], []
    rule, merge_rule = attn_mod._decode_config, attn_mod.merge_in_kernel
    monkeypatch.setattr(attn_mod, "_decode_config", lambda *a: chosen.append(rule(*a)) or chosen[-1])
    monkeypatch.setattr(attn_mod, "merge_in_kernel", lambda *a: merged.append(merge_rule(*a)) or merged[-1])
    monkeypatch.delenv("AUTODEPLOY_DECODE_MERGE", raising=False)
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 700, (300,), generator=g).tolist()
    run_decode(lens, hq=32, hkv=8, d=128, page_size=64, dtype=torch.bfloat16, seed=6, align=64, prefill=[(0, 5)])
    assert chosen[-1] == (64, 2, 3) and merged[-1], (chosen, merged)
    run_decode_fp8(lens, torch.bfloat16, 64, target=target_work_items(2, attn_mod.device_sms(torch.device(DEVICE))),
                   align=64, seed=8)
    assert chosen[-1][:2] == (64, 2) and merged[-1], (chosen, merged)
    run_decode_new_kv(lens, hq=32, hkv=8, d=128, page_size=64, dtype=torch.bfloat16, seed=7, rot=128,
                      target=None, align=64, prefill=[(0, 5)])
    assert chosen[-1][:2] == (64, 2) and merged[-1], (chosen, merged)


def test_new_token_mode_rule(monkeypatch):
    """Separate new-token writes exactly where the short-context launch applies (many programs over short
    caches); fused at batch 1, long caches and in the interpreter; the environment overrides; a bad value names
    the variable."""
    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("AUTODEPLOY_DECODE_NEW_TOKEN", raising=False)
    assert attn_mod.new_token_mode(torch.empty(8, 64, 8, 1), 8, cuda) == "fused"  # interpreter
    monkeypatch.setattr(attn_mod, "_interpreting", lambda: False)
    monkeypatch.setattr(attn_mod, "device_sms", lambda device: 132)
    cb = torch.empty(1024 * 512 // 64, 64, 8, 1)  # 1,024 sequences x 512 tokens, 8 KV heads
    assert attn_mod.short_context_launch(cb, 1024, cuda) == (512, 1024 * 8 / 132, True)
    assert attn_mod.new_token_mode(cb, 1024, cuda) == "separate"
    assert attn_mod.new_token_mode(cb, 1, cuda) == "fused"  # batch 1: long bound, few programs
    long = torch.empty(64 * 4224 // 64, 64, 8, 1)
    assert attn_mod.new_token_mode(long, 64, cuda) == "fused"
    assert attn_mod.new_token_mode(cb, 1024, torch.device("cpu")) == "fused"
    monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", "fused")
    assert attn_mod.new_token_mode(cb, 1024, cuda) == "fused"
    monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", "separate")
    assert attn_mod.new_token_mode(long, 1, cuda) == "separate"
    monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", "both")
    with pytest.raises(ValueError, match="AUTODEPLOY_DECODE_NEW_TOKEN"):
        attn_mod.new_token_mode(cb, 1024, cuda)
