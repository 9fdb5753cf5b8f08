"""Pre-quantized checkpoints: the tests write tiny Llama checkpoints in the compressed-tensors and ModelOpt FP8
formats themselves (weights quantized with our quantizers, config as each format documents it), then
``autodeploy.compile(dir)`` must keep the stored weights and scales (no second quantization), match the
eager model built from the same files exactly, stay close to the unquantized model, and refuse bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import save_file

import autodeploy
from autodeploy.errors import ConfigError, UnsupportedModelError
from autodeploy.models import quantized as qload
from autodeploy.ops import quant
from helpers import rel_rms, hf_prompt_logits, prompt_logits
from model_zoo import make_model

PROMPT = [1, 5, 9, 22, 7, 3, 44, 12, 100, 101, 17]
CALIB = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59]]
KW = dict(max_batch_size=2, max_seq_len=64, page_size=4)


def logits(cm, prompt=PROMPT):
    return prompt_logits(cm, prompt)


def hf_logits(model, prompt=PROMPT):
    return hf_prompt_logits(model, prompt)


def _input_absmax(model) -> dict[str, torch.Tensor]:
    """Per-linear activation absmax over CALIB (static input scales, as a calibrating quantizer computes them)."""
    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, inp, name=name: stats.__setitem__(name, max(stats.get(name, 0.0), float(inp[0].abs().max())))))
    with torch.no_grad():
        for p in CALIB:
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return stats


def write_checkpoint(path: Path, model, fmt: str, *, per_channel: bool = True, static: bool = False,
                     mode: str = "fp8", ignore=("lm_head",), edit=None, hf_quant_file: bool = False,
                     qc_extra: Optional[dict] = None) -> Path:
    """Quantize ``model``'s linears (all but ``ignore``) and save them the way ``fmt`` stores them."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    absmax = _input_absmax(model) if static else {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name in ignore:
            continue
        w = sd[f"{name}.weight"]
        if mode == "fp8":
            q, s = quant.quantize_fp8_weight(w, per_channel=per_channel)
        else:
            q, s = quant.quantize_int8_weight(w)
        sd[f"{name}.weight"] = q
        if fmt == "compressed-tensors":
            sd[f"{name}.weight_scale"] = s.reshape(-1, 1) if per_channel else s.reshape(1)
        else:  # modelopt: per-tensor scales are 0-d tensors
            sd[f"{name}.weight_scale"] = s.reshape(-1, 1) if per_channel else s.reshape(())
        if static:
            in_scale = torch.tensor(absmax[name] / quant.FP8_MAX, dtype=torch.float32)
            sd[f"{name}.input_scale"] = in_scale.reshape(1) if fmt == "compressed-tensors" else in_scale
    if edit is not None:
        edit(sd)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    if fmt == "compressed-tensors":
        kind = "float" if mode == "fp8" else "int"
        qc = {
            "quant_method": "compressed-tensors", "format": f"{kind}-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False,
                            "strategy": "channel" if per_channel else "tensor"},
                "input_activations": {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": not static,
                                      "strategy": "tensor" if static else "token"},
            }},
            "ignore": list(ignore), "kv_cache_scheme": None,
        }
    else:
        qc = {"quant_method": "modelopt", "quant_algo": "FP8" if static else "FP8_PER_CHANNEL_PER_TOKEN",
              "kv_cache_quant_algo": None, "exclude_modules": list(ignore)}
    qc.update(qc_extra or {})
    if hf_quant_file:
        (path / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {k: v for k, v in qc.items() if k != "quant_method"}}))
    else:
        cfg["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "model.safetensors"))
    return path


CASES = {
    "ct-fp8-channel-dynamic": dict(fmt="compressed-tensors"),
    "ct-fp8-tensor-static": dict(fmt="compressed-tensors", per_channel=False, static=True),
    "ct-int8-channel-dynamic": dict(fmt="compressed-tensors", mode="int8"),
    "modelopt-fp8": dict(fmt="modelopt", per_channel=False, static=True),
    "modelopt-fp8-per-channel": dict(fmt="modelopt"),
    "modelopt-fp8-hf_quant_config": dict(fmt="modelopt", per_channel=False, static=True, hf_quant_file=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prequantized_checkpoint_compiles_with_its_scales(tmp_path, case):
    kw = CASES[case]
    model = make_model("llama")
    ckpt = write_checkpoint(tmp_path / case, model, **kw)
    cm = autodeploy.compile(ckpt, **KW)
    # the eager HF model built from the same files (our QuantizedLinear modules, the op references)
    eager, _, _ = qload.load(ckpt)
    assert sum(isinstance(m, qload.QuantizedLinear) for m in eager.modules()) == 14
    got = logits(cm)
    assert rel_rms(got, hf_logits(eager)) < 1e-4  # the compiled graph runs exactly the checkpoint's math
    assert rel_rms(got, hf_logits(model)) < (0.1 if kw.get("mode", "fp8") == "fp8" else 0.04)
    # the stored tensors are the graph's tensors: nothing was quantized again
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "model.safetensors"))
    gm = cm.graph_module
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target.endswith(("weight_scale", "input_scale")):
            ref = stored[n.target[2:]]
            assert torch.equal(getattr_tensor(gm, n.target).reshape(-1), ref.float().reshape(-1))
    q_ops = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in quant.QUANT_LINEAR_OPS]
    assert len(q_ops) == 14
    text = cm.explain()
    assert "pre-quantized" in text and f"14 linears quantized" in cm.report.quantization
    assert kw["fmt"] in cm.report.quantization


@pytest.mark.parametrize("fmt,kv", [("compressed-tensors", {"kv_cache_scheme": {
    "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"}}),
                                    ("modelopt", {"kv_cache_quant_algo": "FP8"})])
def test_checkpoint_kv_cache_quantization_is_reported_not_applied(tmp_path, caplog, fmt, kv):
    """A checkpoint that declares a quantized KV cache (with stored per-tensor k/v scales) loads and answers as
    the same checkpoint without it; the warning says the KV cache follows compile(kv_cache_dtype=...)."""
    model = make_model("llama")
    layers = model.config.num_hidden_layers

    def kv_scales(sd):
        for i in range(layers):  # where each format keeps them
            attn = f"model.layers.{i}.self_attn."
            k, v = (attn, attn) if fmt == "compressed-tensors" else (attn + "k_proj.", attn + "v_proj.")
            sd[k + "k_scale"], sd[v + "v_scale"] = torch.tensor(0.05), torch.tensor(0.04)

    plain = write_checkpoint(tmp_path / "plain", model, fmt=fmt)
    with_kv = write_checkpoint(tmp_path / "kv", model, fmt=fmt, edit=kv_scales, qc_extra=kv)
    caplog.clear()
    cm = autodeploy.compile(with_kv, **KW)
    key = next(iter(kv))
    assert any(f"{key}=" in r.getMessage() and "is ignored" in r.getMessage() and "kv_cache_dtype" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.equal(logits(cm), logits(autodeploy.compile(plain, **KW)))
    fp8_kv = autodeploy.compile(with_kv, kv_cache_dtype="fp8", **KW)  # what the user asks for holds
    assert rel_rms(logits(fp8_kv), logits(cm)) < 0.05


def getattr_tensor(gm, target):
    from autodeploy.graph.utils import getattr_path

    return getattr_path(gm, target)


def test_matching_mode_is_accepted_and_contradicting_mode_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ct", make_model("llama"), fmt="compressed-tensors")
    assert autodeploy.compile(ckpt, quantization="fp8", **KW).report.quantization.startswith("fp8 from")
    with pytest.raises(ConfigError, match=r"already quantized \(fp8, compressed-tensors.*'int8-weight' contradicts"):
        autodeploy.compile(ckpt, quantization="int8-weight", **KW)


def test_prequantized_cache_round_trip(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ct", make_model("llama"), fmt="modelopt", per_channel=False, static=True)
    a = autodeploy.compile(ckpt, cache_dir=tmp_path / "cache", **KW)
    b = autodeploy.compile(ckpt, cache_dir=tmp_path / "cache", **KW)
    assert not a.report.cache_hit and b.report.cache_hit
    assert torch.equal(logits(a), logits(b)) and b.report.quantization == a.report.quantization
    other = write_checkpoint(tmp_path / "ct2", make_model("llama", seed=3), fmt="modelopt", per_channel=False, static=True)
    c = autodeploy.compile(other, cache_dir=tmp_path / "cache", **KW)
    assert c.report.cache_hit and torch.equal(logits(c), logits(autodeploy.compile(other, **KW)))


def test_dtype_cast_keeps_quantized_tensors(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ct", make_model("llama"), fmt="compressed-tensors")
    model, _, _ = qload.load(ckpt, dtype=torch.bfloat16)
    lin = model.model.layers[0].self_attn.q_proj
    model.to(torch.float16)
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.weight_scale.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float16


def _drop(key):
    return lambda sd: sd.pop(key)


BAD = {
    "missing weight_scale": (dict(fmt="compressed-tensors", edit=_drop("model.layers.0.mlp.up_proj.weight_scale")),
                             "model.layers.0.mlp.up_proj.weight_scale is missing"),
    "per-tensor scale where per-channel": (
        dict(fmt="compressed-tensors", edit=lambda sd: sd.__setitem__("model.layers.1.self_attn.q_proj.weight_scale",
                                                                      torch.ones(1))),
        r"q_proj.weight_scale has shape \[1\]; per-channel scales need \[64, 1\]"),
    "scale of the wrong length": (
        dict(fmt="modelopt", edit=lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight_scale",
                                                            torch.ones(65, 1))),
        r"down_proj.weight_scale has shape \[65, 1\]"),
    "missing static input_scale": (
        dict(fmt="modelopt", per_channel=False, static=True, edit=_drop("model.layers.0.self_attn.o_proj.input_scale")),
        "o_proj.input_scale is missing"),
    "float weight where quantized": (
        dict(fmt="compressed-tensors", edit=lambda sd: sd.__setitem__(
            "model.layers.0.self_attn.k_proj.weight", sd["model.layers.0.self_attn.k_proj.weight"].float())),
        r"k_proj.weight is torch.float32, but the quantization config says fp8"),
    "quantized weight on an ignored layer": (
        dict(fmt="compressed-tensors", edit=lambda sd: sd.__setitem__(
            "lm_head.weight", sd["lm_head.weight"].to(torch.float8_e4m3fn))),
        "lm_head.weight is stored torch.float8_e4m3fn, but the quantization config keeps lm_head"),
    "weight of the wrong shape": (
        dict(fmt="compressed-tensors", edit=lambda sd: sd.__setitem__(
            "model.layers.0.mlp.gate_proj.weight", sd["model.layers.0.mlp.gate_proj.weight"][:, :32].contiguous())),
        r"gate_proj.weight has shape \[128, 32\], the model expects \[128, 64\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_refused_by_name(tmp_path, case):
    kw, message = BAD[case]
    ckpt = write_checkpoint(tmp_path / "bad", make_model("llama"), **kw)
    with pytest.raises(UnsupportedModelError, match=message):
        autodeploy.compile(ckpt, **KW)


def test_unsupported_schemes_are_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ct", make_model("llama"), fmt="compressed-tensors")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="float 4-bit"):
        autodeploy.compile(ckpt, **KW)
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quant_algo 'NVFP4' is not supported"):
        autodeploy.compile(ckpt, **KW)


def test_plain_checkpoints_take_the_normal_path(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "plain")
    assert not qload.is_quantized_checkpoint(tmp_path / "plain")
    cm = autodeploy.compile(tmp_path / "plain", **KW)
    assert rel_rms(logits(cm), hf_logits(model)) < 1e-4 and not cm.report.quantization
