"""GPU checks (run on the H100 through benchmarks/run_gpu_checks.sh; skipped on CPU).

Token-identity checks run in fp32 (the project's standard: greedy tokens identical in fp32); bf16 is checked
on logits (2e-2 relative RMS), since bf16 rounding legitimately differs between kernels."""

import os

import pytest
import torch

import autodeploy
from autodeploy.metadata import SequenceChunk
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling import SamplingConfig
from helpers import gpu_llama

pytestmark = pytest.mark.gpu
if os.environ.get("TRITON_INTERPRET") == "1":
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="compiled Triton kernels only")]




def _prompts(n, vocab=32000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 200, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"request {i}: first mismatch at token {next(j for j, (p, q) in enumerate(zip(x, y)) if p != q)}"
    return "equal"


def test_triton_backend_matches_torch_backend_greedy_64():
    model = gpu_llama(torch.float32)
    cfg = SamplingConfig(max_new_tokens=64, ignore_eos=True)
    prompts = _prompts(6)
    outs = {}
    for backend in ("torch", "triton"):
        cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, backend=backend)
        assert cm.report.backend == backend
        outs[backend] = [o.output_ids for o in Engine(cm).generate(prompts, cfg)]
    assert outs["triton"] == outs["torch"], _first_diff(outs["triton"], outs["torch"])


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_short_context_launch_equals_fused_greedy(monkeypatch, kv):
    """160 short sequences in a cache sized for them: the short-context decode launch the rules pick (new tokens
    written by the RoPE + cache-write kernel ahead of the split kernel, splits merged by ticket; the 2-warp
    config is bf16's, checked by test_gpu_short_context_config) against the fused launch with the reduction
    kernel, forced, through captured steps: the same fp32 greedy tokens, over an fp32 cache and an FP8 one."""
    from autodeploy.backends.triton import ops

    model = gpu_llama(torch.float32)
    cfg = SamplingConfig(max_new_tokens=40, ignore_eos=True)
    g = torch.Generator().manual_seed(8)
    lens = torch.randint(3, 120, (160,), generator=g).tolist()
    prompts = [torch.randint(0, 32000, (n,), generator=g).tolist() for n in lens]
    outs, chosen = {}, []
    rule = ops.new_token_mode
    monkeypatch.setattr(ops, "new_token_mode", lambda *a: chosen.append(rule(*a)) or chosen[-1])
    for modes in ("auto:auto", "fused:reduce"):
        monkeypatch.setenv("AUTODEPLOY_DECODE_NEW_TOKEN", modes.split(":")[0])
        monkeypatch.setenv("AUTODEPLOY_DECODE_MERGE", modes.split(":")[1])
        cm = autodeploy.compile(model, max_batch_size=160, max_seq_len=256, lowering="cudagraph", kv_cache_dtype=kv)
        outs[modes] = [o.output_ids for o in Engine(cm).generate(prompts, cfg)]
        if modes == "auto:auto":
            assert "separate" in chosen, chosen  # the rule took the short-context launch
    assert outs["auto:auto"] == outs["fused:reduce"], (kv, _first_diff(outs["auto:auto"], outs["fused:reduce"]))


def test_triton_backend_bf16_logits_match_hf():
    model = gpu_llama(torch.bfloat16, seed=4)
    cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, backend="triton")
    prompts = _prompts(4, seed=4)
    ps = cm.page_size
    chunks, nxt = [], 0
    for p in prompts:  # first half as a prefill step, then the rest as an extend step
        n = -(-len(p) // ps)
        chunks.append((p, list(range(nxt, nxt + n))))
        nxt += n
    half = [max(1, len(p) // 2) for p in prompts]
    cm.forward(cm.pack([SequenceChunk(p[:h], 0, pg) for (p, pg), h in zip(chunks, half)]))
    b = cm.pack([SequenceChunk(p[h:] or p[-1:], h if len(p) > 1 else 0, pg)
                 for (p, pg), h in zip(chunks, half)], all_logits=True)
    got = cm.forward(b).float()
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ref = model(torch.tensor([p], device="cuda")).logits[0].float()
            rows = [r for r, s in enumerate(b.logits_rows) if s == i]
            h = half[i] if len(p) > 1 else 0
            err = ((got[rows] - ref[h:]).pow(2).mean().sqrt() / ref[h:].pow(2).mean().sqrt()).item()
            assert err < 2e-2, f"prompt {i}: bf16 rel RMS {err:.3e}"


def test_auto_picks_triton_on_cuda():
    cm = autodeploy.compile(gpu_llama(torch.bfloat16, layers=1), max_batch_size=2, max_seq_len=128)
    assert cm.report.backend == "triton"
    assert "triton" in cm.explain()


@pytest.mark.parametrize("lowering", ["torch-compile", "cudagraph", "cudagraph-piecewise", "cudagraph-decode",
                                      "torch-compile+cudagraph"])
def test_lowering_modes_match_eager_greedy_64(lowering):
    model = gpu_llama(torch.float32, seed=1)
    cfg = SamplingConfig(max_new_tokens=64, ignore_eos=True)
    prompts = _prompts(5, seed=1)
    ref_cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, lowering="eager")
    ref = [o.output_ids for o in Engine(ref_cm).generate(prompts, cfg)]
    cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, lowering=lowering)
    if "cudagraph" in lowering:  # start-up warm-up captured every bucket
        assert sorted(cm.graph_runner.captured) == cm.graph_runner.buckets
        before = dict(cm.graph_runner.replays)
    got = [o.output_ids for o in Engine(cm).generate(prompts, cfg)]
    assert got == ref, _first_diff(got, ref)
    if "cudagraph" in lowering:
        assert cm.graph_runner.replays != before, "decode steps should have replayed captured graphs"


def _mixed_runner(cm):
    """The runner of prefill/mixed steps: whole-step graphs (cudagraph) or pieces (cudagraph-piecewise)."""
    runner = cm.mixed_graphs if cm.report.lowering == "cudagraph" else cm.piecewise
    assert runner is not None and sorted(runner.captured) == runner.buckets
    return runner


@pytest.mark.parametrize("lowering", ["cudagraph", "cudagraph-piecewise"])
def test_cudagraph_with_changing_batch_composition(lowering):
    """Sequences leave and join between steps (different buckets, prefill mixed in); every request's output
    equals its output run alone in eager mode."""
    model = gpu_llama(torch.float32, seed=2)
    eager = autodeploy.compile(model, max_batch_size=16, max_seq_len=512, lowering="eager")
    graph = autodeploy.compile(model, max_batch_size=16, max_seq_len=512, lowering=lowering)
    mixed = _mixed_runner(graph)
    prompts = _prompts(12, seed=3)
    lens = [8 + 5 * i for i in range(12)]
    engine = Engine(graph)
    before = dict(graph.graph_runner.replays)
    reqs, step = [], 0
    while len(reqs) < len(prompts) or engine.has_work():
        if len(reqs) < len(prompts) and step % 3 == 0:  # staggered arrivals: prefill mixed with decodes
            i = len(reqs)
            reqs.append(engine.add_request(prompts[i], SamplingConfig(max_new_tokens=lens[i], ignore_eos=True)))
        engine.step()
        step += 1
    replayed = [b for b, n in graph.graph_runner.replays.items() if n > before.get(b, 0)]
    assert len(replayed) >= 2, replayed  # the batch moved between buckets
    assert sum(mixed.replays.values()) > 0, "mixed steps should have replayed captured graphs"
    got = [r.seqs[0].output_ids for r in reqs]
    ref = [Engine(eager).generate([prompts[i]], SamplingConfig(max_new_tokens=lens[i], ignore_eos=True))[0].output_ids
           for i in range(len(prompts))]
    assert got == ref, _first_diff(got, ref)


def test_async_scheduling_equals_sync_with_cuda_graphs():
    """The sampled tokens reach the next captured step through the upload into the bucket's input buffer; early
    stops land one step late. Outputs must equal the synchronous loop's exactly."""
    model = gpu_llama(torch.float32, seed=3)
    cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, lowering="cudagraph")
    prompts = _prompts(10, seed=4)
    plain = SamplingConfig(max_new_tokens=40, ignore_eos=True)
    mid = [o.output_ids[15] for o in Engine(cm, async_scheduling=False).generate(prompts, plain)]
    cfgs = [SamplingConfig(max_new_tokens=40, stop_token_ids=[mid[i]], ignore_eos=True) if i % 2 else
            SamplingConfig(max_new_tokens=10 + 3 * i, temperature=0.8, top_p=0.9, seed=i) for i in range(10)]
    outs = {}
    for mode in (False, True):
        engine = Engine(cm, async_scheduling=mode)
        outs[mode] = [(o.output_ids, o.finish_reason) for o in engine.generate(prompts, cfgs)]
        assert engine.kv.all_free()
    assert engine.stats.num_async_steps > 0
    assert outs[True] == outs[False]


@pytest.mark.parametrize("lowering", ["cudagraph", "cudagraph-piecewise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_mixed_steps_match_eager(dtype, lowering):
    """Prefill and mixed steps of many token counts (inside, at and across token buckets, sequences crossing
    pages, decodes only behind a prefill) through whole-step graphs (device-composed) or piecewise graphs give
    the eager graph's logits; a small step after a large one in the same bucket is unaffected by stale rows."""
    model = gpu_llama(dtype, seed=5)
    eager = autodeploy.compile(model, max_batch_size=16, max_seq_len=1024, lowering="eager")
    graph = autodeploy.compile(model, max_batch_size=16, max_seq_len=1024, lowering=lowering)
    mixed = _mixed_runner(graph)
    g = torch.Generator().manual_seed(7)
    for spec in ([(300, 0), (1, 40), (1, 90)], [(31, 0)], [(16, 0)], [(17, 5), (1, 64)], [(100, 0)],
                 [(2, 0)] * 7 + [(1, 33)] * 9, [(700, 0), (1, 10)], [(40, 200), (60, 0), (1, 500)],
                 [(3, 0), (1, 900), (1, 600)]):
        chunks, page = [], 0
        for n_new, cached in spec:
            need = -(-(cached + n_new) // graph.page_size)
            chunks.append(SequenceChunk(torch.randint(0, 32000, (n_new,), generator=g).tolist(), cached,
                                        list(range(page, page + need))))
            page += need
        ref = eager.forward(eager.pack(chunks)).float()
        before = sum(mixed.replays.values())
        got = graph.forward(graph.pack(chunks)).float()[:ref.shape[0]]  # whole-step graphs pad logits rows
        assert sum(mixed.replays.values()) == before + 1, spec
        err = ((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (spec, err)


def test_warmup_compiles_the_token_kernels_serving_uses():
    """After compile's warm-up, greedy and sampled steps at odd and even row counts compile no token kernel:
    the engine's pinned step buffer keeps every section 16-byte aligned, so it has the variant the warm-up met
    (an odd count once put the row sums at an 8-byte offset, a second variant compiled mid-serving)."""
    from triton import knobs

    cm = autodeploy.compile(gpu_llama(torch.bfloat16), max_batch_size=8, max_seq_len=256, backend="triton")
    seen = []
    prev = knobs.runtime.jit_post_compile_hook

    def hook(**kw):
        seen.append(getattr(kw.get("fn"), "name", "?"))
        return prev(**kw) if prev else None

    knobs.runtime.jit_post_compile_hook = hook
    try:
        for n in (3, 4, 5):
            Engine(cm).generate(_prompts(n, seed=n), SamplingConfig(max_new_tokens=4, ignore_eos=True))
            Engine(cm).generate(_prompts(n, seed=n), SamplingConfig(max_new_tokens=4, ignore_eos=True,
                                                                    temperature=0.8, top_k=20, seed=1))
    finally:
        knobs.runtime.jit_post_compile_hook = prev
    token_kernels = [s for s in seen if "argmax" in s or "sample" in s]
    assert not token_kernels, f"compiled after warm-up: {token_kernels}"
