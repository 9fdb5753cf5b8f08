"""fuse_gemms: linears sharing one input become one GEMM on a concatenated weight plus a split. Logits still match
HF; only same-input, same-dtype, same-bias-presence linears fuse; the HF model's parameters become views of the
fused weights (its own forward is unchanged); the compile cache stores recipes, not weight copies."""

import pytest
import torch
from torch import fx, nn

import autodeploy
from autodeploy.compiler import compile_cache
from autodeploy.graph.utils import DERIVED_META, aten, getattr_path, is_op
from autodeploy.metadata import SequenceChunk
from autodeploy.passes.fuse_gemms import FUSED_PREFIX, fuse_gemms
from helpers import rel_rms
from model_zoo import make_model

KW = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
PROMPT = [3, 17, 42, 5, 99, 1, 64, 12, 7, 33, 8]


def _linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_op(n, aten.linear)]


def _ptrs(gm: fx.GraphModule) -> list[int]:
    return sorted(getattr_path(gm, n.args[1].target).data_ptr() for n in _fused_linears(gm))


def _fused_linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in _linears(gm) if str(n.args[1].target).startswith(FUSED_PREFIX)]


def _compiled_logits(cm, tokens: list[int]) -> torch.Tensor:
    batch = cm.pack([SequenceChunk(tokens, 0, [0, 1, 2])], all_logits=True)
    return cm.forward(batch)


def _hf_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def _check_family(family: str, qkv_bias: bool):
    model = make_model(family)
    ref = _hf_logits(model, PROMPT)
    cm = autodeploy.compile(model, **KW)
    gm = cm.graph_module
    layers = model.config.num_hidden_layers
    # per layer: qkv + o + gate/up + down, plus the LM head (unfused: 7 linears per layer before)
    assert len(_linears(gm)) == 4 * layers + 1
    fused = _fused_linears(gm)
    a = model.config
    qkv_rows = (a.num_attention_heads + 2 * a.num_key_value_heads) * (a.hidden_size // a.num_attention_heads)
    widths = sorted(int(n.meta["val"].shape[-1]) for n in fused)
    assert widths == sorted([qkv_rows] * layers + [2 * a.intermediate_size] * layers)
    for n in fused:
        has_bias = len(n.args) > 2 and n.args[2] is not None
        assert has_bias == (qkv_bias and int(n.meta["val"].shape[-1]) == qkv_rows)
        recipe = n.args[1].meta[DERIVED_META]
        assert recipe[0] == "cat" and recipe[2] == 0 and all(t.startswith("m.model.layers.") for t in recipe[1])
        split = next(iter(n.users))
        assert is_op(split, aten.split_with_sizes) and sum(split.args[1]) == n.meta["val"].shape[-1]
        assert [tuple(v.shape[-1:]) for v in split.meta["val"]] == [(s,) for s in split.args[1]]
    record = next(p for p in cm.report.passes if p.name == "fuse_gemms")
    assert record.num_matches == 2 * layers
    assert record.notes == [f"{2 * layers} groups: {layers}x[q,k,v], {layers}x[gate,up]"]
    err = rel_rms(_compiled_logits(cm, PROMPT), ref)
    assert err < 1e-4, f"{family}: rel RMS {err:.2e}"
    return model, cm


def test_llama_fuses_qkv_and_gate_up():
    _check_family("llama", qkv_bias=False)


def test_qwen2_fuses_qkv_with_biases():
    model, cm = _check_family("qwen2", qkv_bias=True)
    attn = model.model.layers[0].self_attn
    fused_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    assert any(torch.equal(getattr_path(cm.graph_module, n.args[2].target), fused_bias)
               for n in _fused_linears(cm.graph_module) if len(n.args) > 2)


class _Toy(nn.Module):
    """a, b, c read x (c without bias); d reads y only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 6)
        self.c, self.d = nn.Linear(8, 5, bias=False), nn.Linear(8, 3)

    def forward(self, x, y):
        return self.a(x), self.b(x), self.c(x), self.d(y)


def _export_toy():
    torch.manual_seed(0)
    toy = _Toy().eval()
    args = (torch.randn(2, 8), torch.randn(2, 8))
    unlifted = torch.export.export(toy, args).module()
    return toy, args, fx.GraphModule(unlifted, unlifted.graph)


def _run_pass(gm: fx.GraphModule):
    result = fuse_gemms(gm, None)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return result


def test_only_shared_input_same_bias_linears_fuse():
    toy, args, gm = _export_toy()
    with torch.no_grad():
        ref = toy(*args)
    result = _run_pass(gm)
    assert result.num_matches == 1 and result.notes == ["1 groups: 1x[a,b]"]
    weights = {n.args[1].target for n in _linears(gm)}
    assert weights == {f"{FUSED_PREFIX}_0_weight", "c.weight", "d.weight"}  # c: no bias; d: other input
    with torch.no_grad():
        for got, want in zip(gm(*args), ref):
            torch.testing.assert_close(got, want)


def test_weights_of_different_dtype_are_left_alone():
    toy, _, gm = _export_toy()
    gm.get_submodule("b").weight = nn.Parameter(toy.b.weight.detach().double())
    result = _run_pass(gm)
    assert result.num_matches == 0 and len(_linears(gm)) == 4
    assert toy.a.weight.untyped_storage().data_ptr() != toy.b.weight.untyped_storage().data_ptr()


def test_hf_model_unchanged_and_params_are_views_of_fused_weights():
    model = make_model("llama", seed=4)
    before = _hf_logits(model, PROMPT)
    cm = autodeploy.compile(model, **KW)
    assert torch.equal(_hf_logits(model, PROMPT), before)
    gm = cm.graph_module
    fused_weights = [getattr_path(gm, n.args[1].target) for n in _fused_linears(gm)]
    by_storage = {w.untyped_storage().data_ptr(): w for w in fused_weights}
    assert len(by_storage) == len(fused_weights) == 2 * len(model.model.layers)
    for layer in model.model.layers:
        for sources in ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                        [layer.mlp.gate_proj, layer.mlp.up_proj]):
            fused = by_storage[sources[0].weight.untyped_storage().data_ptr()]
            row = 0
            for m in sources:
                assert isinstance(m.weight, nn.Parameter)
                assert m.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
                assert m.weight.storage_offset() == row * fused.shape[1]
                row += m.out_features
            assert row == fused.shape[0]
    # A second compile of the same model reuses the fused storage instead of copying the weights again.
    again = autodeploy.compile(model, **KW)
    assert _ptrs(again.graph_module) == _ptrs(gm)
    assert torch.equal(_compiled_logits(again, PROMPT), _compiled_logits(cm, PROMPT))


def test_compile_cache_stores_recipes_and_rebuilds_fused_weights(tmp_path):
    kw = dict(KW, cache_dir=tmp_path)
    autodeploy.compile(make_model("qwen2", seed=1), **kw)
    (entry,) = tmp_path.glob(f"*{compile_cache.SUFFIX}")
    model = make_model("qwen2", seed=2)
    fresh = autodeploy.compile(make_model("qwen2", seed=2), **KW)
    warm = autodeploy.compile(model, **kw)
    assert warm.report.cache_hit and "export" not in warm.report.stage_seconds
    state, stored = compile_cache.read_entry(entry)
    fused_targets = {n.args[1].target for n in _fused_linears(warm.graph_module)}
    assert fused_targets and fused_targets <= set(state["derived"])
    assert not any(t in stored or state["attrs"][t].get("stored") for t in state["derived"])  # recipes, no data
    fused_bytes = sum(getattr_path(warm.graph_module, t).nbytes for t in state["derived"])
    assert entry.stat().st_size < fused_bytes / 4
    layer = model.model.layers[1].mlp
    sources = ["m.model.layers.1.mlp.gate_proj.weight", "m.model.layers.1.mlp.up_proj.weight"]
    assert ("cat", sources, 0) in state["derived"].values()
    rebuilt = [getattr_path(warm.graph_module, t) for t in state["derived"]]
    assert any(t.untyped_storage().data_ptr() == layer.up_proj.weight.untyped_storage().data_ptr() for t in rebuilt)
    assert torch.equal(_compiled_logits(warm, PROMPT), _compiled_logits(fresh, PROMPT))
    assert rel_rms(_compiled_logits(warm, PROMPT), _hf_logits(model, PROMPT)) < 1e-4


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_other_families_still_match(family):
    model = make_model(family)
    ref = _hf_logits(model, PROMPT)
    cm = autodeploy.compile(model, **KW)
    assert rel_rms(_compiled_logits(cm, PROMPT), ref) < 1e-4
