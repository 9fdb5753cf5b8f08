"""The attention-variant registry (autodeploy/ops/variants/): one schema for the canonical and cached ops,
capabilities checked by name, reference maths per variant, the Triton kernels' ALiBi and sinks."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import autodeploy.ops  # noqa: F401
from autodeploy.backends import AttentionSpec, get_backend
from autodeploy.ops import attention_reference
from autodeploy.ops.cached import CACHED_OPS
from autodeploy.ops.variants import VARIANTS, param_names

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _spec(**params):
    return AttentionSpec(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, causal=True,
                         dtype=torch.float32, params=params)


def test_every_variant_parameter_is_in_both_schemas():
    canonical = [a.name for a in torch.ops.autodeploy.attention.default._schema.arguments]
    assert canonical[:5] == ["q", "k", "v", "scale", "causal"]
    assert tuple(canonical[5:]) == param_names()
    assert {"sliding_window", "logit_softcap", "sinks", "alibi_slopes", "chunk_size"} <= set(param_names())
    import autodeploy.backends.torch  # noqa: F401

    assert CACHED_OPS, "backends register their cached ops through define_cached_attention"
    for info in CACHED_OPS.values():
        names = [a.name for a in info.overload._schema.arguments]
        assert tuple(names[-len(param_names()):]) == param_names()
        extra = tuple(info.optional_inputs)
        assert tuple(names[names.index("meta") + 1:names.index("scale")]) == extra  # optional caches, by name


def test_cached_signature_is_written_once():
    """The shared schema lives in autodeploy/ops/cached.py only: no backend spells the step inputs out again."""
    hits = [p for p in (ROOT / "backends").rglob("*.py") if "Tensor[] meta" in p.read_text()
            or "custom_op(\"autodeploy::torch_cached" in p.read_text()]
    assert not hits, hits
    assert "Tensor[] meta" in (ROOT / "autodeploy/ops/cached.py").read_text()


def test_supports_refuses_an_undeclared_parameter_by_name():
    torch_backend, triton_backend = get_backend("torch"), get_backend("triton")
    assert torch_backend.supports(_spec(chunk_size=8)) == (True, "supported")
    ok, why = triton_backend.supports(_spec(chunk_size=8))
    assert not ok and "'triton'" in why and "chunk_size" in why
    assert triton_backend.supports(_spec(alibi_slopes=True, sinks=True))[0]
    ok, why = torch_backend.supports(_spec(some_future_param=3))
    assert not ok and "some_future_param" in why, "an unknown field must never be silently accepted"


def test_requested_backend_without_the_capability_is_refused():
    import autodeploy
    from autodeploy.errors import UnsupportedModelError
    from model_zoo import make_model

    with pytest.raises(UnsupportedModelError, match="chunk_size"):
        autodeploy.compile(make_model("llama4"), backend="triton", max_batch_size=2, max_seq_len=32)


def _dense(q, k, v, scale, slopes=None, chunk=None, sinks=None):
    """Straight-line attention for one sequence (q ``[1, Hq, S, D]``)."""
    hq, s = q.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(hq // x.shape[1], 1) for x in (k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    if slopes is not None:
        scores = scores + slopes.view(1, hq, 1, 1) * (j - i)
    vis = j <= i
    if chunk is not None:
        vis &= (i // chunk) == (j // chunk)
    scores = scores.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(1, hq, 1, 1).expand(1, hq, s, 1)], -1)
    p = torch.softmax(scores, -1)
    return (p[..., :s] if sinks is not None else p) @ v


@pytest.mark.parametrize("variant", ["alibi", "chunked", "sinks"])
def test_reference_hooks_match_straight_line_maths(variant):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 11, 8, generator=g), torch.randn(1, 2, 11, 8, generator=g), torch.randn(1, 2, 11, 8,
                                                                                                        generator=g)
    kw = {"alibi": dict(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])), "chunked": dict(chunk=4),
          "sinks": dict(sinks=torch.randn(4, generator=g))}[variant]
    names = {"slopes": "alibi_slopes", "chunk": "chunk_size", "sinks": "sinks"}
    got = attention_reference(q, k, v, 0.3, True, **{names[a]: b for a, b in kw.items()})
    torch.testing.assert_close(got, _dense(q, k, v, 0.3, **kw), rtol=1e-5, atol=1e-5)


def test_alibi_is_one_file_plus_its_registration():
    """No core file names ALiBi: the variant is its file. Without the file the parameter does not exist and a
    Bloom model is refused (not compiled without its bias)."""
    core = ["autodeploy/ops/attention.py", "autodeploy/ops/cached.py", "autodeploy/ops/variants/base.py",
            "autodeploy/ops/variants/__init__.py", "passes/match_attention.py", "passes/insert_kv_cache.py",
            "backends/base.py", "backends/torch/attention.py", "backends/torch/__init__.py"]
    for path in core:
        assert "alibi" not in (ROOT / path).read_text().lower(), path
    assert VARIANTS["alibi"].bias_form is not None and VARIANTS["alibi"].score_mod is not None
    script = (
        "import sys, types; sys.modules['autodeploy.ops.variants.alibi'] = types.ModuleType('stub')\n"
        "sys.path.insert(0, 'tests')\n"
        "import torch, autodeploy\n"
        "from autodeploy.ops.variants import param_names\n"
        "assert 'alibi_slopes' not in param_names(), param_names()\n"
        "from model_zoo import make_model\n"
        "try:\n"
        "    autodeploy.compile(make_model('bloom', 'eager'), max_batch_size=2, max_seq_len=32)\n"
        "except autodeploy.errors.UnsupportedModelError as e:\n"
        "    assert 'bias no registered variant explains' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('compiled without the ALiBi variant')\n"
    )
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Triton kernels: ALiBi and sinks in prefill, split-K decode and the merge (TRITON_INTERPRET=1 on CPU)

triton = pytest.importorskip("triton")


def _kernels():
    import importlib

    import autodeploy.backends.triton.kernels.attention as mod

    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(mod._context_attn_kernel, InterpretedFunction):
            mod = importlib.reload(mod)
    return mod


def _case(seqs, hq=4, hkv=2, d=16, page_size=4, seed=0):
    """Random shuffled paged cache for ``(cached, new)`` sequences (unused rows NaN)."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in seqs]
    n_pages = [math.ceil(L / page_size) for L in lens]
    total = sum(n_pages) + 2
    k_cache = torch.full((total, page_size, hkv, d), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(total, generator=g).tolist()
    table = torch.zeros((len(seqs), max(n_pages) + 1), dtype=torch.int32)
    for s, L in enumerate(lens):
        for p in range(n_pages[s]):
            page = perm.pop()
            table[s, p] = page
            rows = min(page_size, L - p * page_size)
            k_cache[page, :rows] = torch.randn(rows, hkv, d, generator=g)
            v_cache[page, :rows] = torch.randn(rows, hkv, d, generator=g)
    cu = torch.tensor([0] + torch.tensor([n for _, n in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, generator=g)
    return q, k_cache, v_cache, cu, torch.tensor(lens, dtype=torch.int32), table


def _reference(q, k_cache, v_cache, cu, lens, table, scale, **params):
    out = torch.zeros_like(q)
    page_size, hkv, d = k_cache.shape[1:]
    for s in range(len(lens)):
        lo, hi, L = int(cu[s]), int(cu[s + 1]), int(lens[s])
        if hi == lo:
            continue
        pages = table[s, :math.ceil(L / page_size)].long()
        k = k_cache[pages].reshape(-1, hkv, d)[:L].transpose(0, 1)[None]
        v = v_cache[pages].reshape(-1, hkv, d)[:L].transpose(0, 1)[None]
        out[lo:hi] = attention_reference(q[lo:hi].transpose(0, 1)[None], k, v, scale, True,
                                         **params)[0].transpose(0, 1)
    return out


PARAMS = {
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "sinks": dict(sinks=torch.tensor([1.5, -0.5, 0.3, 2.0])),
    "alibi+sinks+window": dict(alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]),
                               sinks=torch.tensor([0.5, 1.0, -1.0, 0.0]), sliding_window=5),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_triton_prefill_matches_reference(name):
    mod = _kernels()
    seqs = [(0, 9), (5, 6), (3, 1), (0, 2)]  # fresh prefill, extend across a page boundary, a decode, short
    q, kc, vc, cu, lens, table = _case(seqs)
    params = PARAMS[name]
    ref = _reference(q, kc, vc, cu, lens, table, 0.25, **params)
    for max_q_len in (9, None):
        out = torch.full_like(q, float("nan"))
        mod.context_attention(q, kc, vc, cu, lens, table, out, num_seqs=len(seqs), max_q_len=max_q_len,
                              scale=0.25, sliding_window=params.get("sliding_window"), logit_softcap=None,
                              sinks=params.get("sinks"), alibi_slopes=params.get("alibi_slopes"))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("page_tiles", [True, False])
@pytest.mark.parametrize("name", list(PARAMS))
def test_triton_split_k_decode_and_merge_match_reference(name, page_tiles, monkeypatch):
    mod = _kernels()
    from autodeploy.backends.triton.partition import decode_partition

    monkeypatch.setattr(mod, "DECODE_PAGE_TILES", page_tiles)
    # a prefill (left alone), decodes whose keys cross page edges; whole-page tiles need a page of 16+
    page_size = 16 if page_tiles else 4
    seqs = [(6, 3), (5 * page_size + 2, 1), (7, 1), (3 * page_size, 1)]
    q, kc, vc, cu, lens, table = _case(seqs, seed=1, page_size=page_size)
    params = PARAMS[name]
    ref = _reference(q, kc, vc, cu, lens, table, 0.25, **params)
    out = torch.full_like(q, float("nan"))
    part = decode_partition(lens, cu, target=6, window=params.get("sliding_window") or 0, align=4)
    mod.decode_attention(q, kc, vc, lens, table, out, scale=0.25, sliding_window=params.get("sliding_window"),
                         logit_softcap=None, sinks=params.get("sinks"), cu_seqlens_q=cu, partition=part,
                         alibi_slopes=params.get("alibi_slopes"))
    assert int((part[1][1:] - part[1][:-1]).max()) > 1, "the case must split a sequence (exercises the merge)"
    n_pre = int(cu[1])
    assert torch.isnan(out[:n_pre]).all(), "decode kernel wrote into prefill rows"
    torch.testing.assert_close(out[n_pre:], ref[n_pre:], rtol=1e-4, atol=1e-4)
