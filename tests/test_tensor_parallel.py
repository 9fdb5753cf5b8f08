"""Tensor parallelism: the sharding pass in-process (a fake rank of a fake world: shapes, plan, refusals), then
real 2-rank groups over gloo (spawned worker processes): greedy tokens and logits equal HF's, weight bytes per
rank about half, a killed worker becomes a clear error, shutdown leaves no process behind."""

from __future__ import annotations

import copy
import functools
import os
import signal
import time

import pytest
import torch

from autodeploy.compiler.context import CompileContext
from autodeploy.compiler.pass_manager import PassManager
from autodeploy.compiler.pipeline import Pipeline
from autodeploy.compiler.report import CompileReport
from autodeploy.distributed import WorkerDiedError
from autodeploy.errors import UnsupportedModelError
from autodeploy.models import export_model
from autodeploy.passes.shard_tensor_parallel import TensorParallelError
from helpers import assert_mixed_batch_matches_hf, hf_greedy
from model_zoo import COMMON, make_model


def _mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}))
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def _olmo2(**kw):  # q_norm/k_norm over the whole projection (all heads at once)
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    return Olmo2ForCausalLM(Olmo2Config(**{**COMMON, **kw})).eval()


@functools.lru_cache(maxsize=None)
def _cached_model(family: str, items: tuple):
    return {"mixtral": _mixtral, "olmo2": _olmo2}.get(family, lambda **k: make_model(family, **k))(**dict(items))


def _model(family: str, **kw):
    """One model per config for the in-process tests (the pass never changes it: each rank shards a copy)."""
    return _cached_model(family, tuple(sorted(kw.items())))


_EXPORTED: dict[int, object] = {}


def shard(model, world: int, rank: int, drop=(), cache: bool = True):
    """The canonical graph through the sharding pass (and cache insertion unless ``cache=False``), as rank
    ``rank`` of ``world`` (each model is exported once; every rank shards its own copy)."""
    if id(model) not in _EXPORTED:
        _EXPORTED[id(model)] = export_model(model, 4, 64, 128)
    gm = copy.deepcopy(_EXPORTED[id(model)])
    ctx = CompileContext(max_batch_size=4, max_seq_len=64, max_num_tokens=128, page_size=0,
                         device=torch.device("cpu"), dtype=torch.float32, backend="torch", report=CompileReport())
    names = [n for n in Pipeline.default().names if n not in drop]
    names = names[:names.index("insert_kv_cache")]
    tp = ("shard_tensor_parallel", {"world_size": world, "rank": rank, "group_name": "0"})
    PassManager(names + [tp] + (["insert_kv_cache"] if cache else []), ctx.report).run(gm, ctx)
    return gm, ctx


def _attr(gm, suffix: str) -> torch.Tensor:
    hits = [t for name, t in list(gm.named_parameters()) + list(gm.named_buffers()) if name.endswith(suffix)]
    assert len(hits) == 1, (suffix, len(hits))
    return hits[0]


def _collectives(gm) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and "_c10d_functional" in str(n.target) and "wait" not in str(n.target):
            key = str(n.target).split(".")[-2]
            out[key] = out.get(key, 0) + 1
    return out


# -- the pass, in-process --------------------------------------------------------------------------------------
def test_llama_plan_shapes_and_collectives():
    model = _model("llama")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gm, ctx = shard(model, world=2, rank=1)
    # heads split: 4 q / 2 kv -> 2 / 1 per rank, and the cache specs say so
    assert [(s.num_heads, s.num_kv_heads) for s in ctx.attention_specs] == [(2, 1), (2, 1)]
    q = _attr(gm, "layers.0.self_attn.q_proj.weight")
    o = _attr(gm, "layers.0.self_attn.o_proj.weight")
    down = _attr(gm, "layers.0.mlp.down_proj.weight")
    emb = _attr(gm, "embed_tokens.weight")
    # rank 1 holds the second block: rows for column-parallel, columns for row-parallel, vocab rows
    torch.testing.assert_close(q, sd["model.layers.0.self_attn.q_proj.weight"][32:])
    torch.testing.assert_close(o, sd["model.layers.0.self_attn.o_proj.weight"][:, 32:])
    torch.testing.assert_close(down, sd["model.layers.0.mlp.down_proj.weight"][:, 64:])
    torch.testing.assert_close(emb, sd["model.embed_tokens.weight"][64:])
    # an all-reduce after every row-parallel linear (o, down) and the embedding, one all-gather of the logits
    assert _collectives(gm) == {"all_reduce": 2 * 2 + 1, "all_gather_into_tensor": 1}
    plan = gm.meta["tensor_parallel_plan"]
    assert plan.roles["model.layers.1.self_attn.k_proj"] == "column"
    assert plan.roles["model.layers.1.mlp.down_proj"] == "row"
    assert plan.roles["lm_head"].startswith("vocab")
    assert 0.45 < plan.local_bytes / plan.full_bytes < 0.56  # half, plus the replicated norms
    notes = "\n".join(ctx.report.render().splitlines())
    assert "weights per rank" in notes and "model.layers.0.mlp.gate_proj: column" in notes


def test_gqa_fewer_kv_heads_than_ranks_replicates_them():
    model = _model("llama", num_attention_heads=4, num_key_value_heads=2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    d = 16
    for rank in (0, 3):
        gm, ctx = shard(model, world=4, rank=rank)
        assert [(s.num_heads, s.num_kv_heads) for s in ctx.attention_specs] == [(1, 1), (1, 1)]
        kv_head = rank // 2  # ranks 0,1 read KV head 0; ranks 2,3 KV head 1
        k = _attr(gm, "layers.0.self_attn.k_proj.weight")
        torch.testing.assert_close(k, sd["model.layers.0.self_attn.k_proj.weight"][kv_head * d:(kv_head + 1) * d])
        q = _attr(gm, "layers.0.self_attn.q_proj.weight")
        torch.testing.assert_close(q, sd["model.layers.0.self_attn.q_proj.weight"][rank * d:(rank + 1) * d])


def test_fused_expert_gemms_split_per_part():
    """Without the MoE op (match_moe off), HF's grouped expert GEMMs: gate_up [E, 2I, H] is cut in each half."""
    model = _model("mixtral")
    full = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    gm, _ = shard(model, world=2, rank=0, drop=("match_moe",))
    plan = gm.meta["tensor_parallel_plan"]
    assert plan.roles["model.layers.0.mlp.experts.gate_up_proj"] == "column (2 fused parts)"
    local = _attr(gm, "layers.0.mlp.experts.gate_up_proj")
    inter = full.shape[1] // 2
    torch.testing.assert_close(local, torch.cat([full[:, :inter // 2], full[:, inter:inter + inter // 2]], 1))


def test_moe_op_sharded_by_argument_name():
    from autodeploy.passes import match_moe  # noqa: F401  (the MoE op exists)

    model = _model("mixtral")
    gm, _ = shard(model, world=2, rank=1)
    moe = [n for n in gm.graph.nodes if "moe_experts" in str(n.target)]
    assert len(moe) == 2
    w = {k: tuple(v.meta["val"].shape) for k, v in moe[0].kwargs.items() if hasattr(v, "meta")}
    assert w["w_gate"] == (4, 64, 64) and w["w_up"] == (4, 64, 64) and w["w_down"] == (4, 64, 64)
    assert all(any("all_reduce" in str(u.target) for u in n.users) for n in moe)


@pytest.mark.parametrize("mode", ["int8-weight", "fp8"])
def test_sharded_experts_are_quantized_as_the_rank_holds_them(mode):
    """A rank's experts are its cut of the model's tensors, quantized per (expert, output channel) as cut: both
    ranks' quantized graphs, run together, give the unsharded quantized model's logits within the quantization's
    own error, and each rank's recipe rebuilds exactly the tensor it holds (gate/up cut along their output
    channels, down along its inputs, where each rank's partial sum is scaled before the all-reduce)."""
    from autodeploy.passes.quantize_linears import DERIVE_OPS, MOE_RECIPE, QuantizationConfig
    from autodeploy.graph.utils import DERIVED_META, getattr_path
    from helpers import rel_rms

    model = _model("mixtral")
    gms = []
    for rank in range(2):
        gm, ctx = shard(model, world=2, rank=rank, cache=False)
        ctx.quantization = QuantizationConfig(mode)
        PassManager(["quantize_linears"], ctx.report).run(gm, ctx)
        moe = [n for n in gm.graph.nodes if n.target is torch.ops.autodeploy.moe_experts_quant.default]
        assert len(moe) == 2 and not [n for n in gm.graph.nodes if n.target is torch.ops.autodeploy.moe_experts.default]
        for node in moe:
            for name in ("w_gate", "s_gate", "w_down", "s_down"):
                attr = node.kwargs[name]
                recipe = attr.meta[DERIVED_META]
                assert recipe[0] == MOE_RECIPE
                sources = [getattr_path(model, t[len("m."):]) for t in recipe[1]]
                rebuilt = DERIVE_OPS[MOE_RECIPE](sources, *recipe[2:])
                assert torch.equal(rebuilt.view(torch.uint8) if rebuilt.element_size() == 1 else rebuilt,
                                   getattr_path(gm, attr.target).view(torch.uint8)
                                   if rebuilt.element_size() == 1 else getattr_path(gm, attr.target)), name
        gms.append(gm)
    whole, wctx = shard(model, world=1, rank=0, cache=False)
    wctx.quantization = QuantizationConfig(mode)
    PassManager(["quantize_linears"], wctx.report).run(whole, wctx)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    pos = torch.arange(8)[None]
    outs = _simulate(gms, ids, pos, torch.arange(8))
    with torch.no_grad():
        ref_q = whole(ids, pos, torch.arange(8))
        ref = model(ids).logits
    ref_q = (ref_q[0] if isinstance(ref_q, (tuple, list)) else ref_q).reshape(ref.shape)
    bound = rel_rms(ref_q, ref)  # the unsharded quantized model's own error
    assert 0 < bound < 0.1
    for out in outs:
        out = (out[0] if isinstance(out, (tuple, list)) else out).reshape(ref.shape)
        assert rel_rms(out, ref) < 1.5 * bound + 1e-3
        assert rel_rms(out, ref_q) < 2 * bound + 1e-3


def test_refuses_a_norm_over_all_heads():
    """OLMo2 normalizes q over the whole projection: a rank holds half the heads, so its norm would be wrong."""
    with pytest.raises(TensorParallelError, match=r"rms_norm.*q_norm.*normalizes over the sharded dim"):
        shard(_model("olmo2"), world=2, rank=0)


def test_refuses_heads_not_divisible():
    with pytest.raises(UnsupportedModelError, match=r"4 query heads are not divisible by tensor_parallel_size=3"):
        shard(_model("llama"), world=3, rank=0)


def test_refuses_unknown_reader_of_a_sharded_value():
    """A node with no tensor-parallel rule reading a sharded value is refused by name, never guessed."""
    from autodeploy.passes import shard_tensor_parallel as tp

    saved = tp._RULES.pop(torch.ops.aten.silu)
    try:
        with pytest.raises(TensorParallelError, match=r"silu.*no tensor-parallel rule"):
            shard(_model("llama"), world=2, rank=0)
    finally:
        tp._RULES[torch.ops.aten.silu] = saved


def _canonical(model, world: int, rank: int, drop=()):
    """The sharded canonical graph (before cache insertion: it runs on the reference attention)."""
    return shard(model, world, rank, drop, cache=False)[0]


def _simulate(gms: list, *inputs) -> list:
    """Run every rank's graph in its own thread, their collectives exchanged in memory (a barrier per call)."""
    import threading

    world = len(gms)
    barrier, slots = threading.Barrier(world), [None] * world

    def exchange(rank, x, combine):
        slots[rank] = x
        barrier.wait()
        out = combine(list(slots))
        barrier.wait()
        return out

    for rank, gm in enumerate(gms):
        def all_reduce(x, op, group, rank=rank):
            return exchange(rank, x, lambda xs: torch.stack(xs).sum(0))

        def all_gather(x, n, group, rank=rank):
            return exchange(rank, x, lambda xs: torch.cat(xs, 0))

        def wait(x):
            return x

        swap = {torch.ops._c10d_functional.all_reduce.default: all_reduce,
                torch.ops._c10d_functional.all_gather_into_tensor.default: all_gather,
                torch.ops._c10d_functional.wait_tensor.default: wait}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in swap:
                node.target = swap[node.target]
        gm.recompile()
    outs = [None] * world

    def run(rank):
        with torch.no_grad():
            outs[rank] = gms[rank](*inputs)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outs


@pytest.mark.parametrize("family,kw,drop", [
    ("llama", {}, ()), ("qwen2", {"num_key_value_heads": 1}, ()), ("mixtral", {}, ()),
    ("mixtral", {}, ("match_moe",))], ids=["llama", "qwen2-mqa-bias", "mixtral-moe-op", "mixtral-grouped-gemm"])
def test_sharded_graphs_compute_the_full_model(family, kw, drop):
    """Both ranks' graphs, run together with in-memory collectives, give HF's logits (Qwen2: q/k/v biases cut
    with their rows, its one KV head replicated; Mixtral through the MoE op and through HF's grouped GEMMs)."""
    from helpers import rel_rms

    model = _model(family, **kw)
    gms = [_canonical(model, 2, r, drop) for r in range(2)]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    pos = torch.arange(8)[None]
    outs = _simulate(gms, ids, pos, torch.arange(8))
    with torch.no_grad():
        ref = model(ids).logits
    for out in outs:
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert rel_rms(out.reshape(ref.shape), ref) < 1e-4


# -- real groups: 2 ranks over gloo ------------------------------------------------------------------------------
PROMPTS = [[1, 5, 9, 3], [7, 7, 2, 11, 4, 8, 20, 31, 2, 9, 40, 13, 22, 17, 3, 5, 6]]  # the second crosses a page


@pytest.fixture(scope="module")
def llama_tp(tmp_path_factory):
    from autodeploy.compiler.driver import compile as ad_compile

    model = _model("llama")
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    # page size 4 and 40 pages: what helpers.mixed_batch_logits writes
    options = dict(max_batch_size=4, max_seq_len=64, backend="torch", page_size=4, num_pages=40)
    alone = ad_compile(str(path), **options).generate(PROMPTS, max_new_tokens=6)  # one process, before the group
    cm = ad_compile(str(path), tensor_parallel_size=2, **options)
    cm.single_process_tokens = alone
    yield model, cm
    cm.shutdown()


@pytest.mark.parametrize("family", ["qwen3", "mixtral"])
def test_tp2_greedy_matches_hf(tmp_path_factory, family):
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.runtime.sampling import SamplingConfig

    model = _model(family, num_hidden_layers=1)  # one layer: the group's start-up dominates this test
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    greedy = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    one = LLM(str(path), max_batch_size=4, max_seq_len=64, backend="torch", page_size=16)  # one process
    alone = [o.output_ids for o in one.generate(PROMPTS, greedy)]
    llm = LLM(str(path), max_batch_size=4, max_seq_len=64, backend="torch", page_size=16, tensor_parallel_size=2)
    cm = llm.compiled
    try:
        outs = llm.generate(PROMPTS, greedy)
        assert [o.output_ids for o in outs] == alone == [hf_greedy(model, p, 6) for p in PROMPTS]
        _assert_each_rank_read_its_shard(cm)
    finally:
        cm.shutdown()
    assert all(not p.is_alive() for p in cm.tensor_parallel.processes)  # no worker left behind


def test_tp2_quantized_experts_match_one_process(tmp_path_factory):
    """Mixtral under ``int8-weight`` on 2 ranks over gloo, each reading its shard of the checkpoint: the experts
    are quantized on every rank (its own cut), and the greedy tokens equal the one-process quantized model's."""
    from autodeploy.entrypoints.llm import LLM
    from autodeploy.runtime.sampling import SamplingConfig

    model = _model("mixtral", num_hidden_layers=1)
    path = tmp_path_factory.mktemp("mixtral_int8")
    model.save_pretrained(path)
    greedy = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    kw = dict(max_batch_size=4, max_seq_len=64, backend="torch", page_size=16, quantization="int8-weight")
    one = LLM(str(path), **kw)
    assert "1 MoE experts layers quantized" in one.compiled.report.quantization
    alone = [o.output_ids for o in one.generate(PROMPTS, greedy)]
    llm = LLM(str(path), tensor_parallel_size=2, **kw)
    cm = llm.compiled
    try:
        assert "1 MoE experts layers quantized" in cm.report.quantization, cm.report.quantization
        assert [o.output_ids for o in llm.generate(PROMPTS, greedy)] == alone
        _assert_each_rank_read_its_shard(cm)
    finally:
        cm.shutdown()


def _assert_each_rank_read_its_shard(cm) -> None:
    """Every rank read its slices from the checkpoint (measured by the loader's slice reads): about half of the
    bytes, no sharded tensor whole. A rank that loaded the whole model has no such record and fails this."""
    loads = [cm.graph_module.meta.get("shard_loading"), *cm.tensor_parallel.worker_loads]
    assert len(loads) == 2 and all(load is not None for load in loads), "a rank loaded the whole checkpoint"
    for load in loads:
        assert load["sharded"] and load["full_reads_of_sharded"] == []
        assert 0.45 < load["total_read"] / load["checkpoint_bytes"] < 0.6, load["total_read"]
    assert "shard loading read" in cm.explain() and "checkpoint MiB read per rank" in cm.explain()


def test_tp2_llama_tokens_logits_and_weight_bytes(llama_tp):
    model, cm = llama_tp
    out = cm.generate(PROMPTS, max_new_tokens=6)
    assert out == cm.single_process_tokens == [hf_greedy(model, p, 6) for p in PROMPTS]
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [5, 3, 5, 8, 9, 7, 9], [3, 2, 3]]
    assert_mixed_batch_matches_hf(cm, model, seqs, "llama tp=2")  # prefill + decode + extend in one step
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    from autodeploy.distributed.group import weight_bytes

    per_rank = [weight_bytes(cm), *cm.tensor_parallel.worker_bytes]
    assert len(per_rank) == 2
    for b in per_rank:
        assert 0.45 < b / full < 0.6, (b, full)
    assert "tensor parallel over 2 ranks" in cm.explain()
    _assert_each_rank_read_its_shard(cm)
    # a batch run twice would pair this rank's collectives with another step's on the workers: refused
    from autodeploy.distributed import DistributedError
    from autodeploy.metadata import SequenceChunk

    batch = cm.pack([SequenceChunk([1, 2, 3], 0, [0])])
    cm.forward(batch)
    with pytest.raises(DistributedError, match="runs the step packed just before it"):
        cm.forward(batch)
    assert cm.generate(PROMPTS[:1], max_new_tokens=3) == [hf_greedy(model, PROMPTS[0], 3)]  # still in step


def test_tp2_killed_worker_is_a_clear_error(llama_tp):
    """SIGKILL a worker while rank 0 runs steps: the step in flight fails fast with the rank named (no hang
    until a timeout), and every later call fails the same way."""
    import threading

    from autodeploy.entrypoints.llm import LLM
    from autodeploy.metadata import SequenceChunk

    _model_, cm = llama_tp
    worker = cm.tensor_parallel.processes[0]
    threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 .*exited with code -9") as info:
        for _ in range(10_000):
            cm.forward(cm.pack([SequenceChunk(list(range(1, 30)), 0, list(range(8)))]))
    assert info.value.rank == 1
    assert time.monotonic() - t0 < 15
    # through the engine (transactional steps): the request fails with that error, and so does every later one
    for _ in range(2):
        (out,) = LLM(cm).generate([[1, 2, 3]])
        assert out.finish_reason == "error" and "WorkerDiedError: tensor-parallel worker rank 1" in out.error
    assert not worker.is_alive()


def test_cli_flag_reaches_compile():
    import argparse

    from autodeploy.entrypoints.common import add_compile_arguments, compile_options

    p = argparse.ArgumentParser()
    add_compile_arguments(p)
    args = p.parse_args(["--tensor-parallel-size", "2", "--device", "cpu", "--cache-dir", "none"])
    assert compile_options(args)["tensor_parallel_size"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tp2_cuda_nccl_cudagraph(tmp_path):
    """2 GPUs over NCCL, CUDA graphs captured with the collectives inside: greedy tokens equal HF's (fp32); each
    rank read only its shard of the checkpoint onto its GPU."""
    from autodeploy.compiler.driver import compile as ad_compile

    model = make_model("llama")
    model.save_pretrained(tmp_path)
    cm = ad_compile(str(tmp_path), max_batch_size=4, max_seq_len=64, device="cuda", dtype=torch.float32,
                    lowering="cudagraph", tensor_parallel_size=2)
    try:
        assert cm.generate(PROMPTS, max_new_tokens=6) == [hf_greedy(model, p, 6) for p in PROMPTS]
        _assert_each_rank_read_its_shard(cm)
    finally:
        cm.shutdown()
