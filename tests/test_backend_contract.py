"""The backend contract beyond the cached op: the backend owns the cache layout (allocation, bytes per token
for sizing, page copies for copy-on-write, swap out/in) and declares it by key (which backends may share one
model's caches, per layer), an optional host planner run once per step, and a graded CUDA-graph support that
lowering reads. Kernel fusions that do not touch attention run whichever backend runs attention;
``fuse_rope_cache_write`` stays with triton attention."""

import os

import pytest
import torch

import autodeploy
from autodeploy.backends import get_backend, register_backend
from autodeploy.backends.base import AttentionBackend, AttentionSpec, CudaGraphSupport
from autodeploy.backends.registry import kernel_passes
from autodeploy.backends.torch import TorchBackend
from autodeploy.graph.utils import is_op
from autodeploy.metadata import SequenceChunk, SequencePacker
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.sampling import SamplingConfig
from helpers import rel_rms
from model_zoo import make_model

KW = dict(max_batch_size=2, max_seq_len=64, page_size=4)
GREEDY = SamplingConfig(max_new_tokens=5, ignore_eos=True)


class RecordingBackend(TorchBackend):
    """The torch backend with fp64 caches (a different layout: twice the bytes), a host planner and page copies
    that are recorded."""

    name = "torch-contract"
    priority = -100  # never chosen automatically

    def __init__(self):
        self.plans: list[tuple] = []
        self.copies: list[tuple] = []

    def allocate_cache(self, num_pages, page_size, spec, dtype, device):
        return super().allocate_cache(num_pages, page_size, spec, torch.float64, device)

    def plan_step(self, batch, chunks):
        self.plans.append((batch.num_tokens, sum(len(c.token_ids) for c in chunks), batch.num_decode))

    def copy_pages(self, caches, src, dst):
        self.copies.append((len(caches), src.tolist(), dst.tolist()))
        super().copy_pages(caches, src, dst)


RECORDING = register_backend(RecordingBackend())


def _prefill_logits(cm, prompt, pages):
    return cm.forward(cm.pack([SequenceChunk(prompt, 0, pages)], all_logits=True))


def _hf_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def test_cuda_graph_grades():
    assert get_backend("torch").cuda_graph_support() == CudaGraphSupport.PIECEWISE
    assert get_backend("triton").cuda_graph_support() == CudaGraphSupport.WHOLE_STEP

    class Legacy(AttentionBackend):
        device_composed_steps = True

    assert Legacy().cuda_graph_support() == CudaGraphSupport.WHOLE_STEP
    assert get_backend("torch").describe()["cuda_graphs"] == "piecewise"


@pytest.mark.parametrize("grade, expect", [
    (CudaGraphSupport.NONE, (False, None)),
    (CudaGraphSupport.DECODE, (True, None)),
    (CudaGraphSupport.PIECEWISE, (True, "piecewise")),
    (CudaGraphSupport.WHOLE_STEP, (True, "mixed")),
])
def test_lowering_reads_the_grade(monkeypatch, grade, expect):
    """Which graph runners ``cudagraph`` builds for each grade (runners stubbed: no GPU here)."""
    import autodeploy.lowering.cudagraph as cg
    import autodeploy.lowering.piecewise as pw
    from autodeploy.lowering import registry

    class Stub:
        buckets = [16]

        def __init__(self, *a):
            pass

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cg, "CudaGraphRunner", type("Decode", (Stub,), {}))
    monkeypatch.setattr(cg, "MixedGraphRunner", type("Mixed", (Stub,), {}))
    monkeypatch.setattr(pw, "PiecewiseGraphRunner", type("Piecewise", (Stub,), {}))
    backend = type("Graded", (TorchBackend,), {"name": "graded", "cuda_graphs": grade})()

    class FakeCM:
        device = torch.device("cuda")
        max_batch_size = 2
        max_num_tokens = 64
        graph_runner = mixed_graphs = piecewise = None

    cm = FakeCM()
    cm.backend = backend
    fn, reason = registry._with_cuda_graphs(cm, lambda: "fn", "cudagraph", "run eager", mixed="full")
    captured, mixed = expect
    assert (fn is not None) == captured
    assert (cm.graph_runner is not None) == captured
    if not captured:
        assert "supports no CUDA graphs" in reason
    assert (cm.mixed_graphs is not None) == (mixed == "mixed")
    assert (cm.piecewise is not None) == (mixed == "piecewise")


def test_bytes_per_token_follows_the_layout():
    spec = AttentionSpec(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, causal=True,
                         dtype=torch.float32)
    assert get_backend("torch").bytes_per_token(spec, torch.bfloat16) == 2 * (16 + 8) * 2
    assert RECORDING.bytes_per_token(spec, torch.float32) == 2 * (16 + 8) * 8  # fp64 caches


def test_an_overridden_layout_is_private_unless_declared():
    """A backend that overrides a cache-layout method without declaring ``cache_layout_key`` is never mixed with
    another backend per layer (test_backend_fallback.py); the built-ins share the contract's layout."""
    assert get_backend("torch").effective_cache_layout_key() == "paged_kv"
    assert get_backend("triton").effective_cache_layout_key() == "paged_kv"
    assert RECORDING.effective_cache_layout_key() is None
    ok, why = get_backend("torch").can_share_cache(RECORDING)
    assert not ok and "torch-contract keeps its own cache layout" in why
    assert not get_backend("torch").can_share_cache(get_backend("onnxruntime"))[0]  # an engine: never mixed


def test_backend_owned_layout_sizes_and_runs_the_model():
    model = make_model("llama")
    plain = autodeploy.compile(model, backend="torch", num_pages=16, **KW)
    wide = autodeploy.compile(model, backend="torch-contract", num_pages=16, **KW)
    assert all(c.dtype == torch.float64 for c in wide.caches.values())
    assert wide._bytes_per_page() == 2 * plain._bytes_per_page()
    prompt = [4, 8, 15, 16, 23, 42, 7]
    assert rel_rms(_prefill_logits(wide, prompt, [1, 2]), _hf_logits(model, prompt)) < 1e-4


def test_page_copies_go_through_the_backend():
    model = make_model("llama")
    cm = autodeploy.compile(model, backend="torch-contract", **KW)
    RECORDING.copies.clear()
    prompt = list(range(1, 17))  # 4 full pages: a full prefix hit recomputes the last token into a copied page
    engine = Engine(cm)
    a = engine.generate([prompt], GREEDY)[0]
    b = engine.generate([prompt], GREEDY)[0]
    assert b.metrics.num_cached_prompt_tokens == 15 and a.output_ids == b.output_ids
    assert RECORDING.copies and all(n == 2 for n, _, _ in RECORDING.copies)  # per layer: its K and V tensors
    assert len(RECORDING.copies) % 2 == 0  # every layer, each copy


def test_plan_step_runs_once_per_step_and_only_when_defined():
    model = make_model("llama")
    cm = autodeploy.compile(model, backend="torch-contract", **KW)
    RECORDING.plans.clear()
    out = Engine(cm).generate([[3, 4, 5], [6, 7, 8, 9, 10]], GREEDY)
    assert [len(o.output_ids) for o in out] == [5, 5]
    # one prefill step of 8 tokens, then 4 decode steps of 2 sequences (the 5th token needs no forward)
    assert RECORDING.plans == [(8, 8, 0)] + [(2, 2, 2)] * 4
    RECORDING.plans.clear()
    cm.warmup()  # dummy steps are planned too (graph captures pack through the same packer)
    assert RECORDING.plans and RECORDING.plans[0][0] == RECORDING.plans[0][1]
    plain = autodeploy.compile(model, backend="torch", **KW)
    assert plain._plan_step is None and not plain.backend.has_plan_step()
    assert type(plain.packer) is SequencePacker  # nothing added to the hot path


def test_swap_out_and_in_restores_kv_in_other_pages():
    model = make_model("llama")
    cm = autodeploy.compile(model, backend="torch", num_pages=16, **KW)
    prompt = [9, 1, 8, 2, 7, 3, 6]
    _prefill_logits(cm, prompt, [1, 2])
    decode = lambda pages: cm.forward(cm.pack([SequenceChunk([5], len(prompt), pages)]))  # noqa: E731
    want = decode([1, 2]).clone()
    saved = cm.swap_out([1, 2])
    for c in cm.caches.values():
        c[1:3] = torch.randn_like(c[1:3])  # the pages are handed to someone else
    cm.swap_in([7, 4], saved)
    assert torch.equal(decode([7, 4]), want)
    with pytest.raises(ValueError, match="layers"):
        cm.swap_in([7, 4], saved[:1])


def test_kernel_passes_do_not_depend_on_the_attention_backend():
    torch_backend = get_backend("torch")
    passes, _notes = kernel_passes(torch.device("cuda"), torch_backend)
    names = [p.pass_name for p in passes]
    assert names == ["fuse_add_rmsnorm", "fuse_gated_act", "skinny_gemm", "fuse_gemv_gated_act", "moe_kernel",
                     "quant_skinny_gemm", "fuse_fp8_act_quant"]
    assert "fuse_rope_cache_write" not in names  # tied to triton attention
    passes, notes = kernel_passes(torch.device("cpu"), torch_backend)
    assert passes == [] and any("kernels from triton skipped" in n for n in notes)
    assert kernel_passes(torch.device("cuda"), torch_backend, [])[0] == []
    # an engine backend exports the whole graph, whose exporter knows only canonical ops: no foreign kernels
    passes, notes = kernel_passes(torch.device("cuda"), get_backend("onnxruntime"))
    assert passes == [] and any("onnxruntime lowers the whole graph" in n for n in notes)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")
def test_torch_attention_with_triton_kernels_matches_hf():
    model = make_model("llama")
    cm = autodeploy.compile(model, backend="torch", kernels=["triton"], **KW)
    graph = cm.graph_module.graph
    assert any(is_op(n, torch.ops.autodeploy.triton_fused_add_rms_norm) for n in graph.nodes)
    assert any(is_op(n, torch.ops.autodeploy.torch_cached_attention) for n in graph.nodes)
    ran = [p.name for p in cm.report.passes]
    assert "fuse_add_rmsnorm" in ran and "fuse_rope_cache_write" not in ran
    assert ("kernels from triton: fuse_add_rmsnorm, fuse_gated_act, skinny_gemm, fuse_gemv_gated_act, moe_kernel, "
            "quant_skinny_gemm, fuse_fp8_act_quant") in cm.explain()
    prompt = [4, 8, 15, 16, 23, 42, 7]
    assert rel_rms(_prefill_logits(cm, prompt, [1, 2]), _hf_logits(model, prompt)) < 1e-4


def test_kernels_option_is_checked(monkeypatch):
    with pytest.raises(autodeploy.ConfigError, match="kernels must be"):
        autodeploy.compile(make_model("llama"), kernels="triton", **KW)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(autodeploy.BackendUnavailableError, match="kernel provider 'triton' cannot run here"):
        autodeploy.compile(make_model("llama"), backend="torch", kernels=["triton"], **KW)


def _hf_greedy_on(model, prompt, n):
    gen = model.generation_config
    saved, gen.eos_token_id = gen.eos_token_id, None
    try:
        out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    finally:
        gen.eos_token_id = saved
    return out[0, len(prompt):].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled Triton kernels only")
def test_cuda_torch_attention_runs_triton_kernels():
    """On a GPU, choosing the torch attention backend keeps the Triton kernel fusions (not RoPE+cache write)."""
    model = make_model("llama").cuda()
    cm = autodeploy.compile(model, backend="torch", max_batch_size=4, max_seq_len=128)
    ran = [p.name for p in cm.report.passes]
    assert {"fuse_add_rmsnorm", "fuse_gated_act", "skinny_gemm"} <= set(ran) and "fuse_rope_cache_write" not in ran
    assert cm.report.lowering == "cudagraph"
    prompt = [4, 8, 15, 16, 23, 42, 7]
    got = cm.forward(cm.pack([SequenceChunk(prompt, 0, [1, 2])], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([prompt], device="cuda")).logits[0]
    assert rel_rms(got, ref) < 1e-4
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11] * 20]
    assert cm.generate(prompts, max_new_tokens=16, ignore_eos=True) == [_hf_greedy_on(model, p, 16) for p in prompts]
