"""Per-layer attention backend fallback (registry.select_backend, backends/layered.py): layers the primary backend
cannot run fall back to the highest-priority backend that supports them AND shares the primary's cache layout;
still one metadata node; the CUDA-graph grade is the weakest involved; explain() names every fallback; a strict
request, or a layer nothing compatible runs, is refused naming the layer, the backend and the capability."""

import os

import pytest
import torch

import autodeploy
from autodeploy.backends import get_backend, registry
from autodeploy.backends.base import AttentionBackend, AttentionSpec, CudaGraphSupport
from autodeploy.backends.layered import LayeredBackend
from autodeploy.backends.triton import TritonBackend
from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.utils import is_op
from autodeploy.ops.variants import param_names
from autodeploy.runtime.sampling import SamplingConfig
from helpers import assert_mixed_batch_matches_hf, hf_greedy, rel_rms
from model_zoo import make_model

CPU = torch.device("cpu")
interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")


def _spec(layer, **params):
    return AttentionSpec(layer=layer, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, causal=True,
                         dtype=torch.float32, params=params)


class Fast(AttentionBackend):
    """A fast backend without chunked attention: whole-step graphs, its own field and a host planner."""

    name, priority, default_page_size = "fast", 100, 32
    capabilities = frozenset({"sliding_window"})
    metadata_fields = ("fast_field",)
    device_composed_steps = True

    def __init__(self):
        self.plans = []

    def plan_step(self, batch, chunks):
        self.plans.append(batch)

    def cached_attention_op(self):
        return "fast-op"


class Ref(AttentionBackend):
    """Runs every variant on the contract's layout; decode-only CUDA graphs."""

    name, priority = "ref", 0
    capabilities = frozenset(param_names())
    metadata_fields = ("seq_idx",)
    cuda_graphs = CudaGraphSupport.DECODE

    def cached_attention_op(self):
        return "ref-op"


class Private(Ref):
    """Runs everything, ranks above ``ref``, but lays its cache out its own way (and declares no key)."""

    name, priority = "private", 50

    def allocate_cache(self, num_pages, page_size, spec, dtype, device):
        return super().allocate_cache(num_pages, page_size, spec, torch.float64, device)


class Engine(Ref):
    """Lowers the whole graph to one engine: never mixed with another backend."""

    name, priority, engine_lowering = "engine", 200, "engine"
    capabilities = frozenset({"sliding_window"})


@pytest.fixture
def only(monkeypatch):
    """Replace the registry with just the given fake backends for one test."""

    def install(*backends):
        monkeypatch.setattr(registry, "_loaded", True)
        monkeypatch.setattr(registry, "_BACKENDS", {b.name: b for b in backends})
        return backends

    return install


MIXED = [_spec(0, chunk_size=8), _spec(1), _spec(2, chunk_size=8), _spec(3, sliding_window=4)]


def test_layers_fall_back_to_a_backend_sharing_the_cache_layout(only):
    fast, ref, private = only(Fast(), Ref(), Private())
    choice = registry.select_backend(MIXED, CPU)
    model = choice.backend
    assert isinstance(model, LayeredBackend) and choice.primary is fast and model.name == "fast"
    # private ranks above ref but keeps its own layout: never a fallback
    assert [model.layer_backend(s).name for s in MIXED] == ["ref", "fast", "ref", "fast"]
    assert [(f.layers, f.backend) for f in choice.fallbacks] == [((0, 2), "ref")]
    assert "layers 0,2 -> ref: backend 'fast' lacks the capabilities ['chunk_size']" in choice.notes()[0]
    assert "weakest" in choice.notes()[1] and model.label == "fast+ref"
    # metadata: each layer its own backend's fields; the one node derives the union
    assert [model.layer_metadata_fields(s) for s in MIXED] == [("seq_idx",), ("fast_field",)] * 2
    assert model.model_metadata_fields(MIXED) == ("seq_idx", "fast_field")
    # lowering: the weakest grade; the primary's page size and layout for every layer
    assert model.cuda_graph_support() == CudaGraphSupport.DECODE and not model.device_composed_steps
    assert model.default_page_size == 32 and model.cache_names(MIXED[0]) == ("k_cache", "v_cache")
    # host planning: every involved backend that has a planner, once per step
    assert model.has_plan_step()
    model.plan_step("batch", [])
    assert fast.plans == ["batch"]
    with pytest.raises(TypeError, match="layer_backend"):
        model.cached_attention_op()


def test_a_backend_running_every_layer_needs_no_combination(only):
    fast, _ref = only(Fast(), Ref())
    choice = registry.select_backend([_spec(0), _spec(1, sliding_window=4)], CPU)
    assert choice.backend is fast and choice.fallbacks == () and choice.notes() == []


def test_cache_layout_compatibility_is_declared():
    fast, ref, private = Fast(), Ref(), Private()
    assert fast.effective_cache_layout_key() == "paged_kv" == ref.effective_cache_layout_key()
    assert private.effective_cache_layout_key() is None  # overrode allocate_cache, declared no key
    ok, why = fast.can_share_cache(private)
    assert not ok and "private keeps its own cache layout" in why
    own = type("OwnKey", (Private,), {"name": "own", "cache_layout_key": "fp64_pages"})()
    ok, why = fast.can_share_cache(own)
    assert not ok and "cache layouts differ" in why and "'fp64_pages'" in why
    opted_in = type("OptIn", (Private,), {"name": "optin", "cache_layout_key": "paged_kv"})()
    assert fast.can_share_cache(opted_in)[0]  # declared the shared key: trusted to read the layout
    ok, why = fast.can_share_cache(Engine())
    assert not ok and "one engine" in why
    assert get_backend("torch").can_share_cache(get_backend("triton"))[0]
    assert get_backend("torch").describe()["cache_layout_key"] == "paged_kv"


def test_no_compatible_backend_refuses_naming_layer_backend_and_capability(only):
    only(Fast(), Private())
    with pytest.raises(UnsupportedModelError) as err:
        registry.select_backend(MIXED, CPU, "fast")
    msg = str(err.value)
    assert "backend 'fast'" in msg and "layer 0" in msg and "chunk_size" in msg
    assert "private keeps its own cache layout" in msg
    # automatically, the private-layout backend runs the whole model instead
    choice = registry.select_backend(MIXED, CPU)
    assert choice.backend.name == "private" and not choice.fallbacks
    assert "no backend that shares its cache layout" in choice.rejected["fast"]


def test_strict_request_is_refused_and_auto_picks_a_backend_for_every_layer(only):
    only(Fast(), Ref(), Private())
    with pytest.raises(UnsupportedModelError, match=r"layer 0 .*'fast' lacks the capabilities \['chunk_size'\].*"
                                                    r"backend_fallback=False"):
        registry.select_backend(MIXED, CPU, "fast", fallback=False)
    choice = registry.select_backend(MIXED, CPU, fallback=False)
    assert choice.backend.name == "private" and "fast" in choice.rejected
    choice = registry.select_backend(MIXED, CPU, "fast")  # requested, fallback on: allowed and reported
    assert choice.primary.name == "fast" and "fall back to ['ref']" in choice.reason


def test_the_fallback_must_take_the_primary_page_size(only):
    small = type("SmallPages", (Ref,), {"name": "small",
                                        "supports_page_size": lambda self, p: (p <= 16, "pages of 16 at most")})()
    only(Fast(), small)
    with pytest.raises(UnsupportedModelError, match="small: pages of 16 at most"):
        registry.select_backend(MIXED, CPU, "fast")  # fast's default page size is 32
    assert registry.select_backend(MIXED, CPU, "fast", page_size=16).backend.layer_backend(MIXED[0]) is small


def test_the_fallback_must_name_the_same_cache_tensors(only):
    extra = type("Extra", (Ref,), {"name": "extra", "cache_layout_key": "paged_kv",
                                   "cache_names": lambda self, spec: ("k_cache", "v_cache", "extra")})()
    only(Fast(), extra)
    with pytest.raises(UnsupportedModelError, match=r"extra: its cache tensors \['k_cache', 'v_cache', 'extra'\]"):
        registry.select_backend(MIXED, CPU, "fast")


def test_engine_backends_never_mix_and_a_backend_running_no_layer_is_no_primary(only):
    _engine, fast, ref = only(Engine(), Fast(), Ref())
    choice = registry.select_backend(MIXED, CPU)
    assert choice.primary is fast and "one engine" in choice.rejected["engine"]
    assert {choice.backend.layer_backend(s).name for s in MIXED} == {"fast", "ref"}
    chunked = [_spec(0, chunk_size=8), _spec(1, chunk_size=8)]
    choice = registry.select_backend(chunked, CPU)
    assert choice.backend is ref and "runs none of the 2 attention layers" in choice.rejected["fast"]
    with pytest.raises(UnsupportedModelError, match="runs none of the 2"):
        registry.select_backend(chunked, CPU, "fast")


# --- the real thing: Llama-4 text (chunked RoPE layers, full-attention NoPE layers) on triton, under the interpreter
def _llama4():
    return make_model("llama4", num_hidden_layers=3, no_rope_layers=[1, 0, 1])  # layers 0, 2 chunked


@interpreter
def test_llama4_on_triton_runs_chunked_layers_on_torch_and_matches_hf(tmp_path):
    model = _llama4()
    cm = autodeploy.compile(model, backend="triton", max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48,
                            cache_dir=tmp_path)
    graph = cm.graph_module.graph
    ops = {n.meta["attention_layer"]: n.target for n in graph.nodes if "attention_layer" in n.meta}
    assert ops == {0: torch.ops.autodeploy.torch_cached_attention.default,
                   1: torch.ops.autodeploy.triton_cached_attention.default,
                   2: torch.ops.autodeploy.torch_cached_attention.default}
    prep = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.prepare_metadata)]
    assert len(prep) == 1  # one metadata node for both backends, deriving both backends' fields
    fields = prep[0].args[-1].split(",")
    assert {"seq_idx", "q_abs_pos"} <= set(fields) and any(f.startswith("decode_work") for f in fields)
    assert cm.backend.cuda_graph_support() == CudaGraphSupport.PIECEWISE and not cm.backend.device_composed_steps
    text = cm.explain()
    assert "backend: triton (requested by the user; 2 of 3 attention layers fall back to ['torch'])" in text
    assert "layers 0,2 -> torch: backend 'triton' lacks the capabilities ['chunk_size']" in text
    assert "CUDA-graph grade piecewise, the weakest of the backends involved (triton: whole_step" in text
    assert "fuse_add_rmsnorm" in [p.name for p in cm.report.passes]  # triton's kernel fusions still run
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    assert_mixed_batch_matches_hf(cm, model, seqs, "llama4 triton+torch")
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [9] * 5]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=8, ignore_eos=True))
    assert outs == [hf_greedy(model, p, 8) for p in prompts]
    # a compile-cache hit restores the per-layer choice (not the primary alone)
    hit = autodeploy.compile(model, backend="triton", max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48,
                             cache_dir=tmp_path)
    assert hit.report.cache_hit and isinstance(hit.backend, LayeredBackend)
    assert [hit.backend.layer_backend(s).name for s in hit.ctx.attention_specs] == ["torch", "triton", "torch"]
    assert hit.backend.cuda_graph_support() == CudaGraphSupport.PIECEWISE
    assert "layers 0,2 -> torch" in hit.explain()


@interpreter
def test_llama4_strict_triton_request_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"backend 'triton' cannot run this model: layer 0 .*"
                                                    r"chunk_size.*backend_fallback=False"):
        autodeploy.compile(_llama4(), backend="triton", backend_fallback=False, max_batch_size=2, max_seq_len=32)


class PrivateTorch(type(get_backend("torch"))):
    """The torch backend with its own (fp64) cache layout and no layout key: it may not serve triton layers."""

    def allocate_cache(self, num_pages, page_size, spec, dtype, device):
        return super().allocate_cache(num_pages, page_size, spec, torch.float64, device)


@interpreter
def test_llama4_without_a_compatible_fallback_is_refused(monkeypatch):
    registry.list_backends()  # load the built-ins before replacing one
    monkeypatch.setitem(registry._BACKENDS, "torch", PrivateTorch())
    with pytest.raises(UnsupportedModelError) as err:
        autodeploy.compile(_llama4(), backend="triton", max_batch_size=2, max_seq_len=32)
    msg = str(err.value)
    assert "layer 0" in msg and "chunk_size" in msg and "torch keeps its own cache layout" in msg


class TritonNoFuse(TritonBackend):
    """Runs the triton op but does not ask for fuse_rope_cache_write."""

    name, priority = "triton-nofuse", -100

    def graph_passes(self):
        return []


@interpreter
def test_backend_graph_passes_touch_only_their_own_layers(monkeypatch):
    """fuse_rope_cache_write rewrites a triton cached op only where the layer's backend asked for the pass."""
    from autodeploy.backends.triton.passes.fuse_rope_cache_write import fuse_rope_cache_write

    registry.list_backends()
    monkeypatch.setitem(registry._BACKENDS, "triton-nofuse", TritonNoFuse())
    cm = autodeploy.compile(make_model("llama"), backend="triton-nofuse", max_batch_size=2, max_seq_len=32)
    gm, ctx = cm.graph_module, cm.ctx
    assert "fuse_rope_cache_write" not in [p.name for p in cm.report.passes]
    assert fuse_rope_cache_write(gm, ctx).num_matches == 0  # its layers are not triton's
    triton = get_backend("triton")
    monkeypatch.setattr(ctx, "attention_backend", LayeredBackend(ctx.attention_backend,
                                                                 [triton, ctx.attention_backend]))
    assert fuse_rope_cache_write(gm, ctx).num_matches == 1  # layer 0 runs on triton now, layer 1 does not
    fused = [n.meta["attention_layer"] for n in gm.graph.nodes
             if is_op(n, torch.ops.autodeploy.triton_cached_attention_rope)]
    assert fused == [0]


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled Triton kernels only")
def test_cuda_auto_runs_llama4_on_triton_with_torch_fallback():
    """On a GPU, ``auto`` keeps triton for the full-attention layers; the chunked ones run on torch, and the
    combination lowers with piecewise graphs for mixed steps (torch has no whole-step grade)."""
    from autodeploy.metadata import SequenceChunk

    model = _llama4().cuda()
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64)
    assert cm.report.backend == "triton" and isinstance(cm.backend, LayeredBackend)
    assert [cm.backend.layer_backend(s).name for s in cm.ctx.attention_specs] == ["torch", "triton", "torch"]
    assert cm.report.lowering == "cudagraph" and cm.mixed_graphs is None and cm.piecewise is not None
    prompt = [4, 8, 15, 16, 23, 42, 7, 9, 11, 13]
    pages = list(range(-(-len(prompt) // cm.page_size)))
    got = cm.forward(cm.pack([SequenceChunk(prompt, 0, pages)], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([prompt], device="cuda")).logits[0]
    assert rel_rms(got, ref) < 1e-4
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11] * 20]
    outs = cm.generate(prompts, max_new_tokens=16, ignore_eos=True)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        gen = model.generation_config
        saved, gen.eos_token_id = gen.eos_token_id, None
        try:
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
        finally:
            gen.eos_token_id = saved
        assert o == want


def test_cli_flag_turns_fallback_off():
    import argparse

    from autodeploy.entrypoints.common import add_compile_arguments, compile_options

    p = argparse.ArgumentParser()
    add_compile_arguments(p)
    assert compile_options(p.parse_args(["--device", "cpu"]))["backend_fallback"] is True
    assert compile_options(p.parse_args(["--device", "cpu", "--no-backend-fallback"]))["backend_fallback"] is False
