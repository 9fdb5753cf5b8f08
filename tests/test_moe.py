"""The canonical MoE experts op (autodeploy/ops/moe.py), its matcher (passes/match_moe.py) and the fused Triton
kernel (backends/triton/kernels/moe.py): op against a per-token loop, every listed family against HF eager with
the converted-layer count checked, DBRX export, and the kernel against the reference under the interpreter."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import autodeploy
from autodeploy.errors import AutoDeployError
from autodeploy.graph.utils import DERIVED_META, getattr_path
from autodeploy.ops.moe import (
    ACTIVATIONS, MoEError, moe_inputs, moe_reference_dense, moe_reference_grouped, traceable_experts,
)
from autodeploy.passes.match_moe import apply_steps
from autodeploy.runtime.sampling import SamplingConfig
from helpers import assert_mixed_batch_matches_hf, hf_greedy, mixed_batch_logits, rel_rms
from model_zoo import make_model

MOE = torch.ops.autodeploy.moe_experts
# Triton kernels run under the interpreter on CPU (conftest sets it before triton is imported), compiled on a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                   reason="Triton kernels need the interpreter or a CUDA GPU")


# -- the op ------------------------------------------------------------------------------------------------------
def _loop_reference(x, ids, w, wg, wu, wd, bg=None, bu=None, bd=None, activation="silu", args=None):
    """Token by token, pick by pick, in float64: the definition in the op's docstring."""
    act = ACTIVATIONS[activation].fn
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            xt = x[t].double()
            g = wg[e].double() @ xt + (0 if bg is None else bg[e].double())
            u = wu[e].double() @ xt + (0 if bu is None else bu[e].double())
            y = wd[e].double() @ act(g, u, *(args or ())) + (0 if bd is None else bd[e].double())
            out[t] += float(w[t, k]) * y
    return out


def _inputs(T, H, I, E, K, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    ws = [(torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((E, I, H), (E, I, H), (E, H, I))]
    bs = [(torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((E, I), (E, I), (E, H))] if bias else [None] * 3
    return x, ids, w, ws, bs


@pytest.mark.parametrize("activation,args,bias", [("silu", None, False), ("gelu_tanh", None, True),
                                                  ("swiglu_clamped", [1.702, 1.5], True)])
def test_op_matches_per_token_loop(activation, args, bias):
    x, ids, w, ws, bs = _inputs(11, 16, 24, 5, 2, bias)
    ref = _loop_reference(x, ids, w, *ws, *bs, activation=activation, args=args)
    kw = dict(b_gate=bs[0], b_up=bs[1], b_down=bs[2], activation=activation, activation_args=args)
    for got in (MOE(x, ids, w, *ws, **kw), moe_reference_dense(x, ids, w, *ws, **kw)):
        assert rel_rms(got, ref) < 1e-6


def test_op_accepts_strided_weight_views():
    x, ids, w, (wg, wu, wd), _ = _inputs(6, 16, 8, 4, 2)
    stacked = torch.cat([wg, wu], 1).transpose(1, 2).contiguous()  # [E, H, 2I], as gpt-oss stores it
    views = stacked[..., :8].transpose(1, 2), stacked[..., 8:].transpose(1, 2), wd.transpose(1, 2).contiguous().transpose(1, 2)
    assert rel_rms(MOE(x, ids, w, *views), MOE(x, ids, w, wg, wu, wd)) < 1e-6


def test_op_exports_with_dynamic_tokens():
    _, _, _, ws, _ = _inputs(4, 16, 8, 4, 2)

    class M(torch.nn.Module):
        def forward(self, x, ids, w):
            return MOE(x, ids, w, *ws)

    x, ids, w, _, _ = _inputs(5, 16, 8, 4, 2)
    t = torch.export.Dim("t")
    ep = torch.export.export(M(), (x, ids, w), dynamic_shapes=({0: t}, {0: t}, {0: t}))
    assert any(n.target is MOE.default for n in ep.graph.nodes)
    x2, ids2, w2, _, _ = _inputs(9, 16, 8, 4, 2, seed=1)
    assert torch.allclose(ep.module()(x2, ids2, w2), MOE(x2, ids2, w2, *ws))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(3, 5)), "w_gate/w_up must be"),
    (dict(ids=torch.zeros(6, 2)), "integer tensor"),
    (dict(ids=torch.full((6, 2), 9)), r"topk_ids must lie in \[0, 4\)"),
    (dict(activation="swish9"), "unknown activation 'swish9'"),
    (dict(activation="swiglu_clamped"), r"takes arguments \('alpha', 'limit'\)"),
])
def test_op_refuses_bad_inputs_by_name(change, match):
    x, ids, w, ws, _ = _inputs(6, 16, 8, 4, 2)
    x, ids = change.get("x", x), change.get("ids", ids)
    with pytest.raises(MoEError, match=match) as info:
        MOE(x, ids, w if x.shape[0] == w.shape[0] else w[: x.shape[0]], *ws, activation=change.get("activation", "silu"))
    assert isinstance(info.value, AutoDeployError)


# -- families ----------------------------------------------------------------------------------------------------
C = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)


def _family(name: str):
    import transformers as tf

    if name == "gpt_oss":
        return make_model("gpt_oss", "eager", seed=1)  # HF's sdpa path drops the sinks
    torch.manual_seed(1)
    model = {
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(
            **C, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
            **C, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4,
            num_experts_per_tok=2)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **C, head_dim=16, intermediate_size=128, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
        "olmoe": lambda: tf.OlmoeForCausalLM(tf.OlmoeConfig(
            **C, intermediate_size=48, num_experts=4, num_experts_per_tok=2, eos_token_id=1)),
        "deepseek_v2": lambda: tf.DeepseekV2ForCausalLM(tf.DeepseekV2Config(
            **{**C, "num_key_value_heads": 4}, **MLA, intermediate_size=128, moe_intermediate_size=48,
            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None)),
        "deepseek_v3": lambda: tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **{**C, "num_key_value_heads": 4}, **MLA, intermediate_size=128, moe_intermediate_size=48,
            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=32)),
        "dbrx": lambda: tf.DbrxForCausalLM(tf.DbrxConfig(
            vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))),
    }[name]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # clear greedy margins (as model_zoo.make_model)
    return model.eval()


# family -> MoE layers the matcher must convert (a family whose matcher stops matching fails here)
FAMILIES = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "olmoe": 2, "deepseek_v2": 1, "deepseek_v3": 1,
            "gpt_oss": 2, "dbrx": 2}


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(name):
        if name not in cache:
            model = _family(name)
            cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
            cache[name] = model, cm
        return cache[name]

    return get


def _moe_nodes(cm):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target is MOE.default]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_experts_converted_and_match_hf(compiled, family):
    model, cm = compiled(family)
    record = next(p for p in cm.ctx.report.passes if p.name == "match_moe")
    assert record.num_matches == FAMILIES[family], record.notes
    assert not any("not converted" in n for n in record.notes), record.notes
    nodes = _moe_nodes(cm)
    assert len(nodes) == FAMILIES[family]
    for node in nodes:  # weights are get_attr views of the model's tensors, each with its cache recipe
        args = moe_inputs(node)
        for name in ("w_gate", "w_up", "w_down"):
            attr = args[name]
            assert attr.op == "get_attr"
            op, (src,), steps = attr.meta[DERIVED_META]
            rebuilt = apply_steps(getattr_path(model, src[2:]), steps)
            assert rebuilt.data_ptr() == getattr_path(cm.graph_module, attr.target).data_ptr()  # a view, no copy
    g = torch.Generator().manual_seed(zlib.crc32(family.encode()) % 1000)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    assert_mixed_batch_matches_hf(cm, model, seqs, family)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_family_greedy_matches_hf(compiled, family):
    model, cm = compiled(family)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (6, 17)]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model, p, 12), f"{family}: prompt of {len(p)} tokens diverged"


def test_dbrx_exports_through_the_canonical_op():
    """HF's DBRX experts loop over ``nonzero()`` (a data-dependent trip count): export fails without the
    traceable forward, and the forward is restored afterwards."""
    from autodeploy.models import export_model

    model = _family("dbrx")
    experts = model.transformer.blocks[0].ffn.experts
    gm = export_model(model, 4, 64, 64)
    assert sum(n.target is MOE.default for n in gm.graph.nodes) == 2
    assert "forward" not in experts.__dict__
    with traceable_experts(model):
        assert "forward" in experts.__dict__


def test_unprovable_experts_are_left_as_is():
    """An activation no registered form reproduces: the experts stay plain ATen ops (and still match HF), and
    explain() says which layers and why."""
    import transformers as tf

    torch.manual_seed(2)
    model = tf.MixtralForCausalLM(tf.MixtralConfig(**C, intermediate_size=96, num_local_experts=4,
                                                   num_experts_per_tok=2, hidden_act="tanh")).eval()
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    record = next(p for p in cm.ctx.report.passes if p.name == "match_moe")
    assert record.num_matches == 0 and not _moe_nodes(cm)
    refused = [n for n in record.notes if "not converted" in n]
    assert len(refused) == 2 and "model.layers.0.mlp.experts (MixtralExperts)" in refused[0]
    assert "no registered activation" in refused[0]
    g = torch.Generator().manual_seed(3)
    assert_mixed_batch_matches_hf(cm, model, [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)],
                                  "mixtral/tanh")


def test_llama4_experts_are_refused_with_the_reason():
    """Llama4 scales the experts' *input* by the router score (dense over all experts): not this op's form."""
    from autodeploy.graph.passes import PASSES
    from autodeploy.models import export_model
    from autodeploy.passes import cleanup, match_moe  # noqa: F401  (registers them)

    gm = export_model(make_model("llama4", "sdpa"), 4, 64, 64)
    PASSES["cleanup"](gm, None)
    result = PASSES["match_moe"](gm, None)
    assert result.num_matches == 0
    assert any("Llama4TextExperts" in n and "top-k ids and weights" in n for n in result.notes), result.notes


# -- the Triton kernel (interpreter on CPU) -------------------------------------------------------------------------
@pytest.fixture
def fused():
    pytest.importorskip("triton")
    from autodeploy.backends.triton.kernels.moe import fused_moe

    def run(*args, **kw):
        def move(t):  # tensors, and lists of them (the scales)
            if isinstance(t, (list, tuple)):
                return type(t)(move(v) for v in t)
            return t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t

        out = fused_moe(*map(move, args), **{k: move(v) for k, v in kw.items()})
        return out.cpu()

    return run


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7])
def test_kernel_matches_reference_uneven_loads(fused, dtype, T):
    E, K = 5, 2
    x, _, w, ws, _ = _inputs(T, 32, 40, E, K, dtype=dtype)
    ids = torch.stack([torch.tensor([0, 1 + t % 2]) for t in range(T)])  # expert 0 takes all, 3 and 4 none
    ref = moe_reference_grouped(x, ids, w, *ws)
    got = fused(x, ids, w, *ws)
    assert got.dtype == dtype
    assert rel_rms(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@needs_kernels
def test_kernel_biases_clamped_swiglu_and_strided_views(fused):
    """gpt-oss's form: interleaved gate/up stored [E, H, 2I] (views with stride 2 along I), biases, clamps."""
    x, ids, w, (wg, wu, wd), bs = _inputs(9, 32, 24, 4, 3, bias=True)
    x = x * 4  # clamps engage
    stacked = torch.stack([wg, wu], 2).flatten(1, 2).transpose(1, 2).contiguous()  # [E, H, 2I] interleaved
    views = stacked[..., 0::2].transpose(1, 2), stacked[..., 1::2].transpose(1, 2), wd
    kw = dict(b_gate=bs[0], b_up=bs[1], b_down=bs[2], activation="swiglu_clamped", activation_args=[1.702, 7.0])
    ref = moe_reference_grouped(x, ids, w, wg, wu, wd, **kw)
    assert rel_rms(fused(x, ids, w, *views, **kw), ref) < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_int8_weight_experts_match_the_quantized_reference(fused, dtype):
    """int8-weight experts on the kernels: int8 weights converted as loaded, per-(expert, channel) scales on the
    sums, biases after them, against ``moe_experts_quant``'s reference; strided int8 views too."""
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.passes.quantize_linears import quantize_experts

    x, ids, w, ws, bs = _inputs(11, 32, 48, 4, 2, bias=True, dtype=dtype)
    parts = [quantize_experts(t.float(), "int8-weight") for t in ws]
    q, sc = [p["weight"] for p in parts], [p["scale"] for p in parts]
    kw = dict(b_gate=bs[0], b_up=bs[1], b_down=bs[2])
    ref = moe_quant_reference(x, ids, w, *q, *sc, mode="int8-weight", **kw)
    got = fused(x, ids, w, *q, scales=sc, **kw)
    assert got.dtype == dtype
    assert rel_rms(got, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    wg_t = q[0].transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided along H
    assert rel_rms(fused(x, ids, w, wg_t, q[1], q[2], scales=sc, **kw), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    wrong = fused(x, ids, w, *q, scales=[sc[0] * 1.05, sc[1], sc[2]], **kw)  # the gate scale reaches the output
    assert rel_rms(wrong, ref) > 1e-3


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_fp8_experts_match_the_quantized_reference(fused, dtype):
    """fp8 experts on the kernels: token rows and intermediate rows quantized to E4M3 per row, E4M3 operands in the
    MMAs (upcast under the interpreter), both scales on the sums, biases after them, against
    ``moe_experts_quant``'s reference (``fp8_linear`` per projection); a K tail that is not a whole tile, and
    strided E4M3 views."""
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.passes.quantize_linears import quantize_experts

    x, ids, w, ws, bs = _inputs(11, 96, 40, 4, 2, bias=True, dtype=dtype)  # H=96, I=40: ragged K tiles
    parts = [quantize_experts(t.float(), "fp8") for t in ws]
    q, sc = [p["weight"] for p in parts], [p["scale"] for p in parts]
    assert q[0].dtype == torch.float8_e4m3fn
    kw = dict(b_gate=bs[0], b_up=bs[1], b_down=bs[2])
    ref = moe_quant_reference(x, ids, w, *q, *sc, mode="fp8", **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    got = fused(x, ids, w, *q, scales=sc, mode="fp8", **kw)
    assert got.dtype == dtype and rel_rms(got, ref) < tol, rel_rms(got, ref)
    wd_t = q[2].transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided along I
    assert rel_rms(fused(x, ids, w, q[0], q[1], wd_t, scales=sc, mode="fp8", **kw), ref) < tol
    wrong = fused(x, ids, w, *q, scales=[sc[0], sc[1], sc[2] * 1.05], mode="fp8", **kw)  # the down scale counts
    assert rel_rms(wrong, ref) > 1e-2
    with pytest.raises(AutoDeployError, match="mode 'fp8' takes"):
        fused(x, ids, w, *[t.to(torch.int8) for t in ws], scales=sc, mode="fp8", **kw)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_int8_experts_match_the_quantized_reference(fused, dtype):
    """W8A8 int8 experts on the kernels: token and intermediate rows quantized to int8 per row
    (``quantize_int8_rows``, the reference's rounding), int8 x int8 MMAs with exact int32 sums, both scales on
    the sums, biases after them; fp32 tokens give the reference's values; a ragged K tail and a strided view."""
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.passes.quantize_linears import quantize_experts

    x, ids, w, ws, bs = _inputs(11, 96, 40, 4, 2, bias=True, dtype=dtype, seed=2)
    parts = [quantize_experts(t.float(), "int8") for t in ws]
    q, sc = [p["weight"] for p in parts], [p["scale"] for p in parts]
    kw = dict(b_gate=bs[0], b_up=bs[1], b_down=bs[2])
    ref = moe_quant_reference(x, ids, w, *q, *sc, mode="int8", **kw)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for block_m in (16, 64):
        got = fused(x, ids, w, *q, scales=sc, mode="int8", block_m=block_m, **kw)
        assert got.dtype == dtype and rel_rms(got, ref) < tol, (block_m, rel_rms(got, ref))
    wu_t = q[1].transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided along H
    assert rel_rms(fused(x, ids, w, q[0], wu_t, q[2], scales=sc, mode="int8", **kw), ref) < tol
    wrong = fused(x, ids, w, *q, scales=[sc[0], sc[1] * 1.05, sc[2]], mode="int8", **kw)  # the up scale counts
    assert rel_rms(wrong, ref) > 1e-2


@needs_kernels
def test_quantized_expert_kernels_are_checked_on_each_device(monkeypatch, caplog):
    """The quantized experts' kernels check themselves against the reference once per device: a kernel that is
    wrong there, or fails to run there, is never used (the reference answers), and an error names it."""
    pytest.importorskip("triton")
    from autodeploy.backends.triton.kernels import moe
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.passes.quantize_linears import quantize_experts

    x, ids, w, ws, _ = _inputs(7, 32, 48, 4, 2)
    parts = [quantize_experts(t, "int8-weight") for t in ws]
    args = [t.to(KERNEL_DEVICE) for t in (x, ids, w, *[p["weight"] for p in parts], *[p["scale"] for p in parts])]
    dev = args[0].device
    want = moe_quant_reference(*args, mode="int8-weight")
    monkeypatch.setattr(moe, "_QUANT_CHECKED", {mode: {} for mode in moe._QUANT})
    op = torch.ops.autodeploy.triton_moe_experts_quant
    assert rel_rms(op(*args, mode="int8-weight"), want) < 1e-5
    assert moe._QUANT_CHECKED["int8-weight"] == {str(dev): True}
    real = moe.fused_moe
    for broken, why in ((lambda *a, **k: real(*a, **k) * 1.1, "disagree"),
                        (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no such instruction")), "failed")):
        monkeypatch.setattr(moe, "_QUANT_CHECKED", {mode: {} for mode in moe._QUANT})
        monkeypatch.setattr(moe, "fused_moe", broken)
        caplog.clear()
        assert torch.equal(op(*args, mode="int8-weight"), want)  # the reference answered
        assert moe._QUANT_CHECKED["int8-weight"] == {str(dev): False}
        assert any(why in r.getMessage() and "int8-weight MoE experts" in r.getMessage() for r in caplog.records)


def test_kernel_align_layout():
    pytest.importorskip("triton")
    from autodeploy.backends.triton.kernels.moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [2, 0]])
    row_pair, tile_expert = align_by_expert(ids, 4, 4)
    P = ids.numel()
    assert row_pair.numel() % 4 == 0 and tile_expert.numel() == row_pair.numel() // 4
    flat = ids.reshape(-1)
    for b, e in enumerate(tile_expert.tolist()):
        pairs = [p for p in row_pair[b * 4:(b + 1) * 4].tolist() if p < P]
        assert all(int(flat[p]) == e for p in pairs)
        assert e < 4 or not pairs
    assert sorted(p for p in row_pair.tolist() if p < P) == list(range(P))  # every pair exactly once


@needs_kernels
def test_triton_kernel_pass_end_to_end():
    """kernels=['triton'] (interpreter on CPU; on a GPU compiled, with CUDA-graph lowering): the moe_kernel pass
    swaps in the fused op, and fp32 logits match HF."""
    pytest.importorskip("triton")
    model = _family("gpt_oss").to(KERNEL_DEVICE)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48, backend="torch",
                            kernels=["triton"])
    record = next(p for p in cm.ctx.report.passes if p.name == "moe_kernel")
    assert record.num_matches == 2
    assert sum(n.target is torch.ops.autodeploy.triton_moe_experts.default for n in cm.graph_module.graph.nodes) == 2
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    got = mixed_batch_logits(cm, seqs)
    if KERNEL_DEVICE == "cuda":  # HF's default grouped_mm experts want bf16 on CUDA; its eager loop runs fp32
        model.config._experts_implementation = "eager"
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = model(torch.tensor([s], device=KERNEL_DEVICE)).logits[0]
            assert rel_rms(got[i].to(ref.device), ref) < 1e-4, f"seq {i}"


@needs_kernels
@pytest.mark.parametrize("mode,tol", [("int8-weight", 1e-4), ("fp8", 1e-3), ("int8", 1e-3)])
def test_triton_kernel_pass_runs_quantized_experts(mode, tol):
    """quantization=mode with kernels=['triton']: the quantized experts run the fused kernel and match the torch
    reference's quantized experts over a mixed prefill/decode batch."""
    pytest.importorskip("triton")
    from autodeploy.ops.quant import fp8_support

    if mode == "fp8" and not fp8_support(torch.device(KERNEL_DEVICE))[0]:
        pytest.skip("no FP8 on this device")
    model = _family("gpt_oss").to(KERNEL_DEVICE)
    kw = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48, backend="torch")
    ref = autodeploy.compile(model, quantization=mode, **kw)
    cm = autodeploy.compile(model, quantization=mode, kernels=["triton"], **kw)
    nodes = cm.graph_module.graph.nodes
    assert sum(n.target is torch.ops.autodeploy.triton_moe_experts_quant.default for n in nodes) == 2
    notes = next(p for p in cm.ctx.report.passes if p.name == "moe_kernel").notes
    assert any("2 MoE experts layers run the fused Triton kernel" in n for n in notes), notes
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    got, want = mixed_batch_logits(cm, seqs), mixed_batch_logits(ref, seqs)
    for i in range(len(seqs)):
        assert rel_rms(got[i], want[i]) < tol, f"seq {i}: {rel_rms(got[i], want[i])}"
    dev = str(next(model.parameters()).device)
    assert f"{mode} MoE experts on {dev}: passed" in cm.explain()  # the device check ran before the kernels served


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu():
    from autodeploy.backends.triton.kernels.moe import fused_moe

    x, ids, w, ws, _ = _inputs(64, 1024, 1536, 8, 2, dtype=torch.bfloat16)
    args = [t.cuda() for t in (x, ids, w, *ws)]
    ref = moe_reference_grouped(*args)
    assert rel_rms(fused_moe(*args), ref) < 1e-2
    graph = torch.cuda.CUDAGraph()  # no host sync inside: capturable
    out = fused_moe(*args)
    with torch.cuda.graph(graph):
        out = fused_moe(*args)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_rms(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8-weight", "fp8", "int8"])
def test_quantized_kernels_match_reference_on_gpu(mode):
    """The quantized experts' kernels compiled for the GPU (E4M3 MMAs for fp8), Mixtral-like shapes at a few
    loads, against the reference; the per-device check passes; a CUDA graph replays them."""
    from autodeploy.backends.triton.kernels import moe
    from autodeploy.ops.moe import moe_quant_reference
    from autodeploy.ops.quant import fp8_support
    from autodeploy.passes.quantize_linears import quantize_experts

    if mode == "fp8" and not fp8_support(torch.device("cuda"))[0]:
        pytest.skip("no FP8 on this GPU")
    assert moe._quant_kernels_agree(torch.device("cuda"), mode)
    for T in (1, 64, 512):
        x, ids, w, ws, _ = _inputs(T, 1024, 1536, 8, 2, dtype=torch.bfloat16)
        parts = [quantize_experts(t.float().cuda(), mode) for t in ws]
        q, sc = [p["weight"] for p in parts], [p["scale"] for p in parts]
        x, ids, w = x.cuda(), ids.cuda(), w.cuda()
        ref = moe_quant_reference(x, ids, w, *q, *sc, mode=mode)
        assert rel_rms(moe.fused_moe(x, ids, w, *q, scales=sc, mode=mode), ref) < 2e-2, T
    out = moe.fused_moe(x, ids, w, *q, scales=sc, mode=mode)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe(x, ids, w, *q, scales=sc, mode=mode)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_rms(out, ref) < 2e-2


def test_compile_cache_rebuilds_expert_views_instead_of_storing_them(tmp_path):
    """A cache entry holds no copy of the stacked experts (a Mixtral-8x7B entry would be ~90 GB): the warm load
    rebuilds the views from the caller's model and answers as a fresh compile of those weights does."""
    kw = dict(max_batch_size=2, max_seq_len=64, page_size=4, num_pages=32, cache_dir=tmp_path)
    cold = autodeploy.compile(_family("mixtral"), **kw)
    assert not cold.report.cache_hit
    stored = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    experts = sum(getattr_path(cold.graph_module, moe_inputs(n)[w].target).numel() * 4
                  for n in _moe_nodes(cold) for w in ("w_gate", "w_up", "w_down"))
    assert stored < experts / 4, (stored, experts)
    torch.manual_seed(7)
    other = _family("mixtral")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    warm = autodeploy.compile(other, **kw)
    assert warm.report.cache_hit and len(_moe_nodes(warm)) == 2
    fresh = autodeploy.compile(other, max_batch_size=2, max_seq_len=64, page_size=4, num_pages=32)
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    assert warm.generate([[3, 1, 4, 1, 5]], sampling=sampling) == fresh.generate([[3, 1, 4, 1, 5]], sampling=sampling)
