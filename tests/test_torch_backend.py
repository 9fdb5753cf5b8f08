"""The torch backend's paged attention against the canonical reference, on fresh random mixed batches that
cross page boundaries, with shuffled pages, windows, softcap and sinks."""

import random

import pytest
import torch

from autodeploy.metadata import SequenceChunk, nest_sequences
from autodeploy.ops.attention import attention_reference
from autodeploy.backends.torch.attention import torch_cached_attention
from helpers import rel_rms


def _run_case(seed, hq, hkv, d, page_size, window, softcap, sinks, dtype):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_seq = rng.randint(1, 5)
    num_pages = 64
    free = list(range(num_pages))
    rng.shuffle(free)
    k_cache = torch.zeros(num_pages, page_size, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    full_k, full_v, chunks = [], [], []
    for _ in range(n_seq):
        cached = rng.choice([0, 0, rng.randint(1, 20)])
        new = rng.choice([1, rng.randint(1, 9)])
        total = cached + new
        pages = [free.pop() for _ in range((total + page_size - 1) // page_size)]
        k = torch.randn(total, hkv, d, generator=g).to(dtype)
        v = torch.randn(total, hkv, d, generator=g).to(dtype)
        for p in range(cached):  # pre-fill the cached context
            k_cache[pages[p // page_size], p % page_size] = k[p]
            v_cache[pages[p // page_size], p % page_size] = v[p]
        full_k.append(k)
        full_v.append(v)
        chunks.append(SequenceChunk(list(range(new)), cached, pages))
    b = nest_sequences(chunks, page_size, all_logits=True)
    i = b.inputs
    q_all = torch.randn(b.num_tokens, hq, d, generator=g).to(dtype)
    k_new = torch.cat([full_k[s][chunks[s].num_cached:] for s in b.order])
    v_new = torch.cat([full_v[s][chunks[s].num_cached:] for s in b.order])
    meta = torch.ops.autodeploy.prepare_metadata(i["position_ids"], i["cu_seqlens_q"], i["seq_lens_kv"],
                                                 i["page_table"], i["batch_info"], "seq_idx,tok_offset,q_abs_pos")
    sink_t = torch.randn(hq, generator=g) if sinks else None
    scale = d ** -0.5
    out = torch_cached_attention(q_all, k_new, v_new, k_cache, v_cache, i["cu_seqlens_q"], i["seq_lens_kv"],
                                 i["page_table"], i["slot_mapping"], i["batch_info"], list(meta),
                                 k_scale=None, v_scale=None, scale=scale, sliding_window=window,
                                 logit_softcap=softcap, sinks=sink_t)
    cu = i["cu_seqlens_q"].tolist()
    for row, s in enumerate(b.order):
        q = q_all[cu[row]:cu[row + 1]]
        ref = attention_reference(q.transpose(0, 1)[None], full_k[s].transpose(0, 1)[None],
                                  full_v[s].transpose(0, 1)[None], scale, True, window, softcap, sink_t)
        got = out[cu[row]:cu[row + 1]].transpose(0, 1)[None]
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert rel_rms(got, ref) < tol, f"seq {s} (cached={chunks[s].num_cached}, new={chunks[s].num_new})"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (5, None, False), (None, 4.0, False),
                                                  (None, None, True), (7, 3.0, True)])
def test_torch_paged_attention_matches_reference(seed, window, softcap, sinks):
    _run_case(seed, hq=4, hkv=2, d=16, page_size=4, window=window, softcap=softcap, sinks=sinks,
              dtype=torch.float32)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1), (6, 2)])
def test_torch_paged_attention_gqa_mqa_half(hq, hkv):
    _run_case(11, hq=hq, hkv=hkv, d=32, page_size=8, window=None, softcap=None, sinks=False, dtype=torch.float16)


def test_canonical_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.3)
    got = torch.ops.autodeploy.attention(q, k, v, 0.3, True, None, None, None)
    assert rel_rms(got, ref) < 1e-6
