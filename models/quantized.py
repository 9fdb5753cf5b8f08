"""Pre-quantized checkpoints: load the stored quantized weights and their scales as they are (no second
quantization), into linears that call the canonical quantized ops (``autodeploy/ops/quant.py``).

Formats (a registry keyed by ``quantization_config.quant_method``):

- **compressed-tensors** (llmcompressor): ``config_groups`` each with ``targets`` (``"Linear"``, module names
  or ``"re:<regex>"``), a ``weights`` scheme and an ``input_activations`` scheme; ``ignore`` lists modules kept
  in full precision. Supported: ``float-quantized`` FP8 E4M3 (weights ``channel`` or ``tensor`` strategy,
  activations dynamic ``token`` or static ``tensor`` with a stored ``input_scale``) and ``int-quantized`` int8
  W8A8 (``channel`` weights, dynamic ``token`` activations). Tensors: ``weight``, ``weight_scale``
  (``[N, 1]`` or ``[1]``), ``input_scale`` when static.
- **modelopt** (TensorRT Model Optimizer's unified HF export): ``quant_algo`` ``FP8`` (per-tensor
  ``weight_scale``, static per-tensor ``input_scale``) or ``FP8_PER_CHANNEL_PER_TOKEN`` (per-channel weight
  scales, dynamic activations); ``exclude_modules`` (wildcards) kept in full precision. Read from
  ``config.json``'s ``quantization_config`` or from ``hf_quant_config.json``.

transformers has its own integrations for these methods (needing extra packages); we read the safetensors
ourselves, so neither is needed. A missing or misshapen scale, or a quantized weight where the config says
full precision (or the reverse), is an ``UnsupportedModelError`` naming the tensor.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from autodeploy.errors import UnsupportedModelError
from autodeploy.ops import quant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerScheme:
    """How one linear is stored: its mode, weight-scale granularity, and whether activations use a stored scale."""

    mode: str  # "fp8" | "int8" (the op it runs, as in passes/quantize_linears.MODES)
    per_channel: bool
    static_input: bool


@dataclass
class CheckpointPlan:
    """What a format parser found: per linear name, its scheme, or None to keep it in full precision."""

    format: str
    mode: str
    scheme_for: Callable[[str], Optional[LayerScheme]]
    description: str


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- formats
def _kv_cache_ignored(path: Path, key: str, value: Any) -> None:
    """A checkpoint's KV-cache quantization (and its stored k/v scales) is not applied: the KV cache follows
    ``compile(kv_cache_dtype=...)``, whose ``"fp8"`` derives a scale per (token, head) row, finer than the
    checkpoint's calibrated per-tensor scales."""
    if value:
        log.warning("%s: %s=%s is ignored: the KV cache follows compile(kv_cache_dtype=...) (default the model "
                    "dtype; 'fp8' keeps its own per-row scales, not the checkpoint's)", path, key, value)


def _ct_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None or re.search(pattern[3:], name) is not None
    return pattern == name or name.endswith("." + pattern)


def _ct_scheme(group: dict, name: str) -> LayerScheme:
    w, a = group.get("weights") or {}, group.get("input_activations")
    kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    if bits != 8 or kind not in ("float", "int") or strategy not in ("channel", "tensor"):
        raise UnsupportedModelError(
            f"compressed-tensors group {name!r}: weights {kind} {bits}-bit with strategy {strategy!r} are not supported "
            "(8-bit float with channel/tensor scales, or 8-bit int with channel scales)")
    if not w.get("symmetric", True) or w.get("group_size"):
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: asymmetric or grouped weights are not supported")
    if a is None:
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: weight-only {kind} 8-bit is not supported "
                                    "(W8A8 only); compile the original model with quantization='int8-weight'")
    if a.get("num_bits") != 8 or a.get("type") != kind or not a.get("symmetric", True):
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: input activations {a} are not supported")
    dynamic, a_strategy = bool(a.get("dynamic")), a.get("strategy")
    if dynamic and a_strategy != "token":
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: dynamic activations need strategy 'token'")
    if not dynamic and a_strategy != "tensor":
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: static activations need strategy 'tensor'")
    if kind == "int" and (strategy != "channel" or not dynamic):
        raise UnsupportedModelError(f"compressed-tensors group {name!r}: int8 needs channel weights and dynamic "
                                    "per-token activations")
    return LayerScheme("fp8" if kind == "float" else "int8", strategy == "channel", not dynamic)


def _compressed_tensors(qc: dict, path: Path) -> CheckpointPlan:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "int-quantized", "naive-quantized"):
        raise UnsupportedModelError(f"{path}: compressed-tensors format {fmt!r} is not supported "
                                    "(float-quantized FP8, int-quantized int8)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedModelError(f"{path}: compressed-tensors quantization_config has no config_groups")
    schemes = [(g.get("targets") or [], _ct_scheme(g, gname)) for gname, g in groups.items()]
    modes = {s.mode for _, s in schemes}
    if len(modes) != 1:
        raise UnsupportedModelError(f"{path}: mixed quantization modes {sorted(modes)} in one checkpoint")
    ignore = list(qc.get("ignore") or [])
    _kv_cache_ignored(path, "kv_cache_scheme", qc.get("kv_cache_scheme"))

    def scheme_for(name: str) -> Optional[LayerScheme]:
        if any(_ct_matches(p, name) for p in ignore):
            return None
        for targets, scheme in schemes:
            if any(t == "Linear" or _ct_matches(t, name) for t in targets):
                return scheme
        return None

    return CheckpointPlan("compressed-tensors", modes.pop(), scheme_for, f"compressed-tensors {fmt}")


_MODELOPT_ALGOS = {
    "FP8": LayerScheme("fp8", per_channel=False, static_input=True),
    "FP8_PER_CHANNEL_PER_TOKEN": LayerScheme("fp8", per_channel=True, static_input=False),
}


def _modelopt(qc: dict, path: Path) -> CheckpointPlan:
    algo = str(qc.get("quant_algo", "")).upper()
    if algo not in _MODELOPT_ALGOS:
        raise UnsupportedModelError(f"{path}: ModelOpt quant_algo {qc.get('quant_algo')!r} is not supported "
                                    f"({sorted(_MODELOPT_ALGOS)})")
    _kv_cache_ignored(path, "kv_cache_quant_algo", qc.get("kv_cache_quant_algo"))
    exclude = list(qc.get("exclude_modules") or qc.get("ignore") or [])
    scheme = _MODELOPT_ALGOS[algo]

    def scheme_for(name: str) -> Optional[LayerScheme]:
        if any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) for p in exclude):
            return None
        return scheme

    return CheckpointPlan("modelopt", scheme.mode, scheme_for, f"ModelOpt {algo}")


FORMATS: dict[str, Callable[[dict, Path], CheckpointPlan]] = {
    "compressed-tensors": _compressed_tensors,
    "modelopt": _modelopt,
}


def quantization_config(path: str | os.PathLike) -> Optional[dict]:
    """The checkpoint's quantization config (``config.json`` or ModelOpt's ``hf_quant_config.json``), or None."""
    root = Path(path)
    cfg = _read_json(root / "config.json") or {}
    qc = cfg.get("quantization_config")
    if qc:
        return qc
    hf_quant = _read_json(root / "hf_quant_config.json")
    if hf_quant and isinstance(hf_quant.get("quantization"), dict) and hf_quant["quantization"].get("quant_algo"):
        return {"quant_method": "modelopt", **hf_quant["quantization"]}
    return None


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a pre-quantized checkpoint this module loads (GGUF and others are left alone)."""
    qc = quantization_config(path)
    return bool(qc) and qc.get("quant_method") in FORMATS


def plan(path: str | os.PathLike) -> CheckpointPlan:
    qc = quantization_config(path)
    method = (qc or {}).get("quant_method")
    if method not in FORMATS:
        raise UnsupportedModelError(f"{path}: quant_method {method!r} is not supported ({sorted(FORMATS)})")
    return FORMATS[method](qc, Path(path))


# ---------------------------------------------------------------------------------------------- modules
class QuantizedLinear(nn.Module):
    """A linear whose weight is stored quantized; ``forward`` calls the canonical op, so export sees one node.

    The quantized tensors keep their dtypes under ``model.to(dtype)`` (only device moves apply to them); the
    bias follows the model dtype like any float tensor."""

    def __init__(self, mode: str, weight: Tensor, weight_scale: Tensor, input_scale: Optional[Tensor],
                 bias: Optional[Tensor]):
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp8":
            return torch.ops.autodeploy.fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.bias)
        return torch.ops.autodeploy.int8_linear(x, self.weight, self.weight_scale, None, self.bias)

    def _apply(self, fn, recurse=True):
        fixed = {k: v for k, v in self._buffers.items() if v is not None}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=fixed["weight"].device)).device
        for k, v in fixed.items():
            self._buffers[k] = v.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{self.mode}, in_features={self.in_features}, out_features={self.out_features}"


_STORED_DTYPE = {"fp8": quant.FP8_DTYPE, "int8": torch.int8}


def _quantized_layer(name: str, scheme: LayerScheme, sd: dict[str, Tensor], linear: nn.Linear) -> QuantizedLinear:
    """Check the stored tensors of ``name`` against its scheme and the model's shape; build its module."""
    w = sd.pop(f"{name}.weight")
    n, k = linear.out_features, linear.in_features
    want = _STORED_DTYPE[scheme.mode]
    if w.dtype != want:
        raise UnsupportedModelError(f"{name}.weight is {w.dtype}, but the quantization config says {scheme.mode} "
                                    f"({want})")
    if tuple(w.shape) != (n, k):
        raise UnsupportedModelError(f"{name}.weight has shape {list(w.shape)}, the model expects {[n, k]}")
    scale = sd.pop(f"{name}.weight_scale", None)
    if scale is None:
        raise UnsupportedModelError(f"{name}.weight_scale is missing from the checkpoint (quantized weight without "
                                    "its scale)")
    expect = n if scheme.per_channel else 1
    if scale.numel() != expect or (scale.dim() > 2) or (scale.dim() >= 1 and scale.shape[0] not in (1, n)):
        raise UnsupportedModelError(
            f"{name}.weight_scale has shape {list(scale.shape)}; {'per-channel' if scheme.per_channel else 'per-tensor'}"
            f" scales need {[n, 1] if scheme.per_channel else [1]}")
    scale = scale.float().reshape(n) if scheme.per_channel else scale.float().reshape(())
    in_scale = sd.pop(f"{name}.input_scale", None)
    if scheme.static_input:
        if in_scale is None:
            raise UnsupportedModelError(f"{name}.input_scale is missing (the config says static activation scales)")
        if in_scale.numel() != 1:
            raise UnsupportedModelError(f"{name}.input_scale has shape {list(in_scale.shape)}; a static per-tensor "
                                        "activation scale has one element")
        in_scale = in_scale.float().reshape(())
    else:
        in_scale = None  # dynamic per-token scales; a stored one (from calibration) is not used
    if scheme.mode == "int8" and not scheme.per_channel:
        raise UnsupportedModelError(f"{name}: int8 needs per-channel weight scales")
    bias = sd.pop(f"{name}.bias", None)
    if (bias is None) != (linear.bias is None):
        raise UnsupportedModelError(f"{name}.bias is {'missing' if bias is None else 'unexpected'}")
    return QuantizedLinear(scheme.mode, w, scale, in_scale, bias.to(linear.weight.dtype) if bias is not None else None)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path}: a quantized checkpoint needs *.safetensors weight files")
    sd: dict[str, Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _build(path: Path, dtype: Optional[torch.dtype], attn_implementation: Optional[str]) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours to handle: no transformers quantizer (and its packages)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    dtype = dtype or (stored if isinstance(stored, torch.dtype) else torch.float32)
    try:
        from transformers.initialization import no_init_weights  # the random init is overwritten anyway
    except ImportError:
        no_init_weights = contextlib.nullcontext

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation=attn_implementation or "sdpa")
    return model, dtype


def load(path: str | os.PathLike, dtype: Optional[torch.dtype] = None,
         attn_implementation: Optional[str] = None) -> tuple[nn.Module, Any, list[str]]:
    """``(model, tokenizer or None, notes)`` for a pre-quantized checkpoint directory; the model carries
    ``quant.PREQUANTIZED_ATTR`` = ``{"format", "mode", "layers"}`` for ``compile`` to check ``quantization=``."""
    from autodeploy.models.factory import quiet_transformers

    root = Path(path)
    p = plan(root)
    with quiet_transformers():
        model, dtype = _build(root, dtype, attn_implementation)
    sd = _read_state_dict(root)
    quantized, kept = 0, []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        scheme = p.scheme_for(name)
        w = sd.get(f"{name}.weight")
        stored_quantized = w is not None and w.dtype in (quant.FP8_DTYPE, torch.int8)
        if scheme is None:
            if stored_quantized:
                raise UnsupportedModelError(f"{name}.weight is stored {w.dtype}, but the quantization config keeps "
                                            f"{name} in full precision (ignore/exclude list)")
            kept.append(name)
            continue
        if w is None:
            if name == "lm_head" and getattr(model.config, "tie_word_embeddings", False):
                kept.append(name)
                continue
            raise UnsupportedModelError(f"{name}.weight is missing from the checkpoint")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_layer(name, scheme, sd, module))
        quantized += 1
    if quantized == 0:
        raise UnsupportedModelError(f"{root}: the quantization config matches no linear layer")
    extra = sorted(k for k in sd if k.endswith(("weight_scale", "input_scale", "zero_point")))
    if extra:
        raise UnsupportedModelError(f"{root}: scales for layers that are not quantized linears: {extra[:4]}")
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_quantized_key(model, k)]
    if getattr(model.config, "tie_word_embeddings", False):
        missing = [k for k in missing if not k.startswith("lm_head.")]
        model.tie_weights()
    if missing:
        raise UnsupportedModelError(f"{root}: tensors missing from the checkpoint: {missing[:4]}")
    if unexpected:
        log.warning("%s: ignoring %d checkpoint tensors the model has no place for (e.g. %s)", root,
                    len(unexpected), unexpected[0])
    setattr(model, quant.PREQUANTIZED_ATTR, {"format": p.format, "mode": p.mode, "layers": quantized})
    tokenizer = _tokenizer(root)
    notes = [f"checkpoint {root}", f"pre-quantized {p.description}: {quantized} linears {p.mode} with the stored "
             f"scales, {len(kept)} in full precision", f"attention implementation {attn_implementation or 'sdpa'}"]
    return model.eval(), tokenizer, notes


def _is_quantized_key(model: nn.Module, key: str) -> bool:
    owner, _, _ = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(owner), QuantizedLinear)
    except AttributeError:
        return False


def _tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root)
    except Exception as exc:  # no tokenizer files: token-id prompts still work
        log.info("%s: no tokenizer loaded (%s: %s); prompts must be token ids", root, type(exc).__name__, exc)
        return None
