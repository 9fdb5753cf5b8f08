"""GPU checks (run on the H100 through benchmarks/run_gpu_checks.sh; skipped on CPU)."""

import os

import pytest
import torch

import autodeploy
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling import SamplingConfig

pytestmark = pytest.mark.gpu
if os.environ.get("TRITON_INTERPRET") == "1":
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason="compiled Triton kernels only")]


def _llama(dtype, seed=0, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # clear greedy margins on random weights
    return m.to(dtype).eval()


def _prompts(n, vocab=32000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(3, 200, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_torch_backend_greedy_64(dtype):
    model = _llama(dtype)
    cfg = SamplingConfig(max_new_tokens=64, ignore_eos=True)
    prompts = _prompts(6)
    outs = {}
    for backend in ("torch", "triton"):
        cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, backend=backend)
        assert cm.report.backend == backend
        outs[backend] = [o.output_ids for o in Engine(cm).generate(prompts, cfg)]
    assert outs["triton"] == outs["torch"]


def test_auto_picks_triton_on_cuda():
    cm = autodeploy.compile(_llama(torch.bfloat16, layers=1), max_batch_size=2, max_seq_len=128)
    assert cm.report.backend == "triton"
    assert "triton" in cm.explain()


@pytest.mark.parametrize("lowering", ["torch-compile", "cudagraph"])
def test_lowering_modes_match_eager_greedy_64(lowering):
    model = _llama(torch.bfloat16, seed=1)
    cfg = SamplingConfig(max_new_tokens=64, ignore_eos=True)
    prompts = _prompts(5, seed=1)
    ref_cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512)
    ref = [o.output_ids for o in Engine(ref_cm).generate(prompts, cfg)]
    cm = autodeploy.compile(model, max_batch_size=8, max_seq_len=512, lowering=lowering)
    got = [o.output_ids for o in Engine(cm).generate(prompts, cfg)]
    assert got == ref
    if lowering == "cudagraph":
        assert cm.graph_runner.captured, "decode steps should have replayed captured graphs"


def test_cudagraph_with_changing_batch_composition():
    """Sequences leave and join between steps (different buckets, prefill mixed in); every request's output
    equals its output run alone in eager mode."""
    model = _llama(torch.bfloat16, seed=2)
    eager = autodeploy.compile(model, max_batch_size=16, max_seq_len=512)
    graph = autodeploy.compile(model, max_batch_size=16, max_seq_len=512, lowering="cudagraph")
    prompts = _prompts(12, seed=3)
    lens = [8 + 5 * i for i in range(12)]
    engine = Engine(graph)
    reqs, step = [], 0
    while len(reqs) < len(prompts) or engine.has_work():
        if len(reqs) < len(prompts) and step % 3 == 0:  # staggered arrivals: prefill mixed with decodes
            i = len(reqs)
            reqs.append(engine.add_request(prompts[i], SamplingConfig(max_new_tokens=lens[i], ignore_eos=True)))
        engine.step()
        step += 1
    assert len(graph.graph_runner.captured) >= 2
    for i, r in enumerate(reqs):
        alone = Engine(eager).generate([prompts[i]], SamplingConfig(max_new_tokens=lens[i], ignore_eos=True))[0]
        assert r.seqs[0].output_ids == alone.output_ids, f"request {i}"
