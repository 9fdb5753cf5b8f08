"""The triton backend end to end under TRITON_INTERPRET=1: a whole model compiled with backend="triton"
matches the torch backend on a mixed batch, with RoPE fused into the cache write and RMSNorm fused with the
residual add; auto selection never picks triton on CPU."""

import os

import pytest
import torch

import autodeploy
from autodeploy.graph.utils import is_op
from autodeploy.metadata import SequenceChunk
from helpers import rel_rms
from model_zoo import make_model

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")


def _mixed(cm, seqs):
    pages = {0: [10, 3, 4], 1: [5, 6, 7, 20], 2: [30, 31]}
    l1 = cm.forward(cm.pack([SequenceChunk(seqs[0][:8], 0, pages[0]), SequenceChunk(seqs[1][:5], 0, pages[1])],
                            all_logits=True))
    l2 = cm.forward(cm.pack([SequenceChunk(seqs[0][8:9], 8, pages[0]), SequenceChunk(seqs[1][5:], 5, pages[1]),
                             SequenceChunk(seqs[2], 0, pages[2])], all_logits=True))
    return l1, l2


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_triton_model_matches_torch_backend(family):
    model = make_model(family, "eager" if family == "gemma2" else "sdpa")
    kw = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    tri = autodeploy.compile(model, backend="triton", **kw)
    ref = autodeploy.compile(model, backend="torch", **kw)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    for a, b in zip(_mixed(tri, seqs), _mixed(ref, seqs)):
        assert rel_rms(a, b) < 1e-4
    graph = tri.graph_module.graph
    assert sum(is_op(n, torch.ops.autodeploy.triton_cached_attention_rope) for n in graph.nodes) == 2
    if family != "gemma2":  # Gemma's (1 + w) norms stay plain ops
        assert any(is_op(n, torch.ops.autodeploy.triton_fused_add_rms_norm) for n in graph.nodes)
    assert "fuse_rope_cache_write" in tri.explain() and "triton" in tri.explain()
    # the MLP middle is one gate/up GEMM with the activation folded in per layer (SiLU for Llama/Mistral,
    # GELU-tanh for Gemma): its epilogue at batch 1, the gated-activation kernel for several rows
    gated = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.triton_linear_gated_act)]
    assert len(gated) == 2 and {n.args[3] for n in gated} == {"gelu_tanh" if family == "gemma2" else "silu"}
    assert not any(is_op(n, torch.ops.autodeploy.triton_gated_act) for n in graph.nodes)
    assert not any(is_op(n, torch.ops.aten.silu, torch.ops.aten.gelu) for n in graph.nodes)
    _check_one_metadata_node(tri, expect_windows={"gemma2": {0, 6}, "mistral": {6}, "llama": {0}}[family])


def _check_one_metadata_node(cm, expect_windows):
    """ONE prepare_metadata node derives the decode partition; every attention layer reads the pair of
    fields for its own window straight from it (layers with equal windows share them)."""
    graph = cm.graph_module.graph
    preps = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.prepare_metadata)]
    assert len(preps) == 1
    fields = preps[0].args[-1].split(",")
    assert {f.split(":")[0] for f in fields} == {"decode_work", "decode_split_start"}
    assert {int(f.split("window=")[1].split(";")[0]) for f in fields} == expect_windows
    attn = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.triton_cached_attention_rope)]
    for node, spec in zip(attn, cm.ctx.attention_specs):
        meta = node.args[12]
        assert len(meta) == 2 and all(m.args[0] is preps[0] for m in meta)
        names = [fields[m.args[1]] for m in meta]
        assert all(f"window={spec.sliding_window or 0};" in name for name in names)


def test_skinny_gemm_batch1_decode_matches_torch_backend(monkeypatch):
    """With the skinny-GEMM threshold lowered so every linear qualifies, batch-1 decode (one row: the kernel) and
    prefill (many rows: ATen) give the torch backend's greedy tokens."""
    from autodeploy.backends.triton.kernels import gemv

    monkeypatch.setattr(gemv, "GEMV_MIN_N", 0)
    model = make_model("llama")
    kw = dict(max_batch_size=2, max_seq_len=64, page_size=4, num_pages=32)
    tri = autodeploy.compile(model, backend="triton", **kw)
    linears = [n for n in tri.graph_module.graph.nodes if is_op(n, torch.ops.autodeploy.triton_linear)]
    assert len(linears) == 2 * 3 + 1  # per layer qkv, o, down; plus the LM head
    gate_up = [n for n in tri.graph_module.graph.nodes if is_op(n, torch.ops.autodeploy.triton_linear_gated_act)]
    assert len(gate_up) == 2  # per layer, with the activation in the batch-1 epilogue
    assert not any(is_op(n, torch.ops.aten.linear) for n in tri.graph_module.graph.nodes)
    ref = autodeploy.compile(model, backend="torch", **kw)
    prompt = [[5, 9, 1, 33, 7, 2]]
    assert tri.generate(prompt, max_new_tokens=8) == ref.generate(prompt, max_new_tokens=8)


def test_auto_never_picks_triton_on_cpu():
    cm = autodeploy.compile(make_model("llama"), max_batch_size=2, max_seq_len=32)
    assert cm.report.backend == "torch"
    assert "triton" in cm.report.rejected_backends
    assert "CUDA" in cm.report.rejected_backends["triton"]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_device_composed_steps_match_host_composed(family):
    """The packing a whole-step CUDA graph replays (cudagraph.MixedGraphRunner): padded to a token bucket and a
    sequence count, the prefill/decode split read on the device. Same logits as the host-composed step on every
    composition (prefill only, mixed, decodes only, chunks crossing pages, sliding windows for gemma2), and the
    same KV cache afterwards, so later steps agree too; padding tokens write nowhere."""
    model = make_model(family, "eager" if family == "gemma2" else "sdpa")
    kw = dict(max_batch_size=6, max_seq_len=64, page_size=4, num_pages=64)
    a = autodeploy.compile(model, backend="triton", **kw)
    b = autodeploy.compile(model, backend="triton", **kw)
    assert a.backend.device_composed_steps
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (21, 13, 9, 30)]
    pages = {0: [10, 3, 4, 40, 41, 42], 1: [5, 6, 7, 20], 2: [30, 31, 32], 3: list(range(50, 58))}
    steps = [  # (seq, start, n) chunks per step
        [(0, 0, 6), (1, 0, 5)],
        [(0, 6, 1), (1, 5, 7), (2, 0, 9)],
        [(0, 7, 1), (1, 12, 1), (2, 9, 1)],
        [(3, 0, 30), (0, 8, 9), (1, 13, 1)],
        [(0, 17, 1), (1, 14, 1), (2, 10, 1), (3, 30, 1)],
    ]
    width = 64 // 4
    for step in steps:
        chunks = [SequenceChunk(seqs[s][i:i + n] or [1] * n, i, pages[s]) for s, i, n in step]
        tokens = sum(n for _, _, n in step)
        host = b.forward(b.packer.pack(chunks, pages_width=width))
        dev = a.forward(a.packer.pack(chunks, pages_width=width, compose_on_device=(tokens + 5, len(chunks) + 2)))
        assert dev.shape[0] == len(chunks) + 2
        assert rel_rms(dev[:len(chunks)], host) < 1e-5, step
    used = sorted({p for ps in pages.values() for p in ps} | {a.scratch_page})
    unused = [p for p in range(a.num_pages) if p not in used]
    for name, cache in a.caches.items():
        # the decode tokens' K was rotated by the RoPE kernel instead of the decode kernel: equal up to fp32 ulps
        torch.testing.assert_close(cache, b.caches[name], rtol=0, atol=1e-6)
        assert not cache[unused].any(), f"{name}: a padding token wrote into a page no sequence owns"


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_separate_new_token_write_matches_fused(monkeypatch, kv_cache_dtype):
    """The decode tokens written by the RoPE + cache-write kernel ahead of the split kernel ("separate", the
    many-short-contexts launch) give the fused launch's logits and cache, on prefill-only, mixed and decode-only
    host-composed steps (bf16 and FP8 caches)."""
    model = make_model("llama")
    kw = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48, kv_cache_dtype=kv_cache_dtype)
    fused = autodeploy.compile(model, backend="triton", **kw)
    separate = autodeploy.compile(model, backend="triton", **kw)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (14, 9, 7)]
    pages = {0: [10, 3, 4, 40], 1: [5, 6, 7], 2: [30, 31]}
    steps = [[(0, 0, 6), (1, 0, 5)], [(0, 6, 1), (1, 5, 4), (2, 0, 7)], [(0, 7, 1), (1, 9, 1), (2, 7, 1)],
             [(0, 8, 1), (1, 10, 1)]]
    for step in steps:
        chunks = [SequenceChunk(seqs[s][i:i + n] or [3] * n, i, pages[s]) for s, i, n in step]
        monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", "fused")
        a = fused.forward(fused.pack(chunks, all_logits=True))
        monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", "separate")
        b = separate.forward(separate.pack(chunks, all_logits=True))
        assert rel_rms(b, a) < 1e-5, step
    for name, cache in separate.caches.items():  # fp32 ulps: q/k rotated by another kernel
        torch.testing.assert_close(cache.float(), fused.caches[name].float(), rtol=0, atol=1e-6)
