"""Quantize the graph's linears (``compile(model, quantization=...)``): each ``aten.linear`` on a constant weight
becomes one of the canonical quantized-linear ops (``autodeploy/ops/quant.py``) on a weight quantized here.

It runs after ``fuse_gemms``, so a fused q/k/v or gate/up GEMM is quantized as one (per-output-channel scales
make that the same as quantizing each member). A mode is one registry entry (:data:`MODES`): its op, how it
quantizes a weight, what it calls it. What is skipped keeps full precision, with the reason in ``explain()``:
the LM head, router gates, tiny or odd shapes, weights the graph also reads elsewhere, names in ``ignore``.

Every quantized tensor carries a recipe (``meta[DERIVED_META]``: the model tensors it came from, the mode and
any calibration statistics), so the compile cache rebuilds it from the caller's weights instead of storing
a copy that would be wrong for another checkpoint of the same architecture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, fx

from autodeploy.errors import ConfigError, UnsupportedModelError
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import DERIVED_META, arg, aten, getattr_path, is_op, storage_id, val
from autodeploy.ops import moe as moe_ops, quant

log = logging.getLogger(__name__)

# Model attribute a pre-quantized checkpoint loader sets (models/quantized.py): {"format", "mode", ...}.
PREQUANTIZED_ATTR = quant.PREQUANTIZED_ATTR
RECIPE = "quantize"  # DERIVED_META op name (rebuilt by :func:`rebuild`)


@dataclass
class QuantizationConfig:
    """What ``compile(model, quantization=...)`` takes: a mode name, or this for the details.

    ``mode``: ``"fp8"``, ``"int8"`` or ``"int8-weight"`` (see :data:`MODES`). ``calibration``: token-id prompts
    (``int8`` only): the HF model runs on them once, activation absmax per input channel is collected with
    forward hooks, and SmoothQuant moves activation outliers into the weights (``smoothing_alpha``). Without
    calibration ``int8`` is plain per-token x per-channel W8A8. ``ignore``: regular expressions searched in a
    weight's name (``layers\\.0\\.``, ``down_proj``) to keep in full precision. ``min_features``: linears with
    fewer input or output features stay unquantized (too small to gain). ``quantize_lm_head``: the LM head is
    kept in full precision unless this is set.
    """

    mode: str
    calibration: Optional[Sequence[Sequence[int]]] = None
    smoothing_alpha: float = 0.5
    ignore: Sequence[str] = ()
    min_features: int = 16
    quantize_lm_head: bool = False
    # Filled by :func:`resolve_quantization`, not by users:
    prequantized: Optional[dict] = None  # the checkpoint's format when its weights came quantized
    act_absmax: dict[str, Tensor] = field(default_factory=dict, repr=False)  # weight target -> [K]

    def describe(self) -> dict:
        """Plain data for the compile-cache key and ``explain()`` (calibration prompts by hash)."""
        calib = None
        if self.calibration is not None:
            calib = hashlib.sha256(json.dumps([list(map(int, p)) for p in self.calibration]).encode()).hexdigest()[:16]
        if self.act_absmax:  # the statistics depend on the weights too: another checkpoint must not hit
            h = hashlib.sha256()
            for name in sorted(self.act_absmax):
                h.update(name.encode() + self.act_absmax[name].float().numpy().tobytes())
            calib = f"{calib}:{h.hexdigest()[:16]}"
        return {"mode": self.mode, "calibration": calib, "smoothing_alpha": self.smoothing_alpha,
                "ignore": list(self.ignore), "min_features": self.min_features,
                "quantize_lm_head": self.quantize_lm_head, "prequantized": self.prequantized}


@dataclass(frozen=True)
class QuantMode:
    """One quantization scheme: the op it calls and how it turns a float weight into that op's tensors."""

    name: str
    op: Any
    summary: str
    # (weight [N, K], activation absmax [K] or None, alpha) -> {op argument name: tensor}
    quantize: Callable[[Tensor, Optional[Tensor], float], dict[str, Tensor]]
    uses_calibration: bool = False


def _fp8(w: Tensor, absmax: Optional[Tensor], alpha: float) -> dict[str, Tensor]:
    q, s = quant.quantize_fp8_weight(w, per_channel=True)
    return {"weight": q, "weight_scale": s}


def _int8(w: Tensor, absmax: Optional[Tensor], alpha: float) -> dict[str, Tensor]:
    if absmax is None:
        q, s = quant.quantize_int8_weight(w)
        return {"weight": q, "weight_scale": s}
    smooth = quant.smoothing_factors(absmax, w, alpha)
    q, s = quant.quantize_int8_weight(w.float() * smooth[None, :])
    return {"weight": q, "weight_scale": s, "smooth": smooth}


def _int8_weight(w: Tensor, absmax: Optional[Tensor], alpha: float) -> dict[str, Tensor]:
    q, s = quant.quantize_int8_weight(w)
    return {"weight": q, "weight_scale": s}


MODES: dict[str, QuantMode] = {}


def register_mode(mode: QuantMode) -> QuantMode:
    MODES[mode.name] = mode
    return mode


register_mode(QuantMode("fp8", torch.ops.autodeploy.fp8_linear.default,
                        "W8A8 float8 E4M3, per-output-channel weight scales, dynamic per-token activation scales",
                        _fp8))
register_mode(QuantMode("int8", torch.ops.autodeploy.int8_linear.default,
                        "W8A8 int8, per-output-channel weight scales, dynamic per-token activation scales",
                        _int8, uses_calibration=True))
register_mode(QuantMode("int8-weight", torch.ops.autodeploy.int8_weight_linear.default,
                        "weight-only int8, per-output-channel scales, dequantized inside the GEMM", _int8_weight))


# ---------------------------------------------------------------------------------------------- resolving
def resolve_quantization(quantization: Union[None, str, QuantizationConfig], model: torch.nn.Module,
                         device: torch.device) -> Optional[QuantizationConfig]:
    """Check ``compile``'s ``quantization`` against the model and device, before anything is exported:
    unknown modes, FP8 on a GPU without FP8, and a mode that contradicts a pre-quantized checkpoint are
    ``ConfigError``. Runs the ``int8`` calibration prompts. None when nothing is quantized."""
    pre = getattr(model, PREQUANTIZED_ATTR, None)
    if quantization is None:
        return QuantizationConfig(mode=pre["mode"], prequantized=dict(pre)) if pre else None
    cfg = QuantizationConfig(mode=quantization) if isinstance(quantization, str) else quantization
    if not isinstance(cfg, QuantizationConfig):
        raise ConfigError(f"quantization must be a mode name {sorted(MODES)} or a QuantizationConfig, "
                          f"got {type(quantization).__name__}")
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown quantization mode {cfg.mode!r}; known: {sorted(MODES)}")
    if pre:
        if pre["mode"] != cfg.mode:
            raise ConfigError(
                f"the checkpoint is already quantized ({pre['mode']}, {pre['format']} format); quantization="
                f"{cfg.mode!r} contradicts it. Pass quantization=None (or {pre['mode']!r}) to use its own scales")
        cfg.prequantized = dict(pre)
        return cfg
    if cfg.mode == "fp8":
        ok, why = quant.fp8_support(device)
        if not ok:
            raise ConfigError(f"quantization='fp8' cannot run on {device}: {why}; use 'int8' or 'int8-weight'")
    if not 0.0 <= cfg.smoothing_alpha <= 1.0:
        raise ConfigError(f"smoothing_alpha must be in [0, 1], got {cfg.smoothing_alpha}")
    for pattern in cfg.ignore:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"quantization ignore pattern {pattern!r} is not a regular expression ({exc})") from None
    if cfg.calibration is not None:
        if not MODES[cfg.mode].uses_calibration:
            raise ConfigError(f"calibration applies to int8 (SmoothQuant) only, not {cfg.mode!r}")
        cfg.act_absmax = calibrate(model, cfg.calibration)
    return cfg


@torch.no_grad()
def calibrate(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> dict[str, Tensor]:
    """Per-input-channel activation absmax of every ``nn.Linear``, over all tokens of ``prompts``, keyed by the
    graph's name of its weight (``m.<module path>.weight``)."""
    if not prompts or any(not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
        raise ConfigError("calibration must be a non-empty list of non-empty token-id lists")
    vocab = model.get_input_embeddings().num_embeddings
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ConfigError(f"calibration token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    stats: dict[str, Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(module, inputs):
            x = inputs[0].detach()
            amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(f"m.{name}.weight")))
    device = next(model.parameters()).device
    try:
        for p in prompts:
            model(input_ids=torch.tensor([list(p)], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    log.info("calibration: %d prompts, %d tokens, %d linears observed", len(prompts), sum(map(len, prompts)),
             len(stats))
    return stats


# ---------------------------------------------------------------------------------------------- the pass
def _sources(node: fx.Node) -> Optional[list[str]]:
    """The model tensors a weight get_attr is (itself) or was concatenated from (a fused GEMM's weight)."""
    recipe = node.meta.get(DERIVED_META)
    if recipe is None:
        return [node.target] if node.target.startswith("m.") else None
    if recipe[0] == "cat" and recipe[2] == 0:
        return list(recipe[1])
    return None


def _skip_reason(gm: fx.GraphModule, node: fx.Node, cfg: QuantizationConfig, heads: set[fx.Node]) -> Optional[str]:
    """Why ``node`` (an aten.linear) stays in full precision, or None to quantize it. Rules in order."""
    w_node = node.args[1]
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return "weight is computed in the graph"
    w = getattr_path(gm, w_node.target)
    if not isinstance(w, Tensor) or w.dim() != 2 or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "weight is not a 2-D float tensor"
    n, k = w.shape
    if node in heads and not cfg.quantize_lm_head:
        return "LM head (kept in full precision; QuantizationConfig(quantize_lm_head=True) to quantize it)"
    sources = _sources(w_node)
    if sources is None:
        return "weight is not a model tensor (no recipe to rebuild it from)"
    names = " ".join(sources)
    hit = next((p for p in cfg.ignore if re.search(p, names)), None)
    if hit is not None:
        return f"matches ignore pattern {hit!r}"
    router = next((src for src in sources if re.search(r"(^|\.)(router|gate)\.weight$", src)), None)
    if router is not None:
        return f"router gate {_short(router)} (routing decisions are precision-sensitive)"
    if min(n, k) < cfg.min_features:
        return f"tiny ({n}x{k} < min_features={cfg.min_features})"
    if n % 16 or k % 16:
        return f"odd shape {n}x{k} (quantized GEMMs need multiples of 16)"
    others = [u for u in w_node.users if u is not node]
    if others:
        return f"weight also read by {others[0].name} (quantizing would keep both copies)"
    bias = arg(node, 2, "bias")
    if bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        return "bias is computed in the graph"
    return None


def _absmax(cfg: QuantizationConfig, sources: list[str]) -> Optional[Tensor]:
    stats = [cfg.act_absmax[s] for s in sources if s in cfg.act_absmax]
    if not stats:
        return None
    out = stats[0]
    for s in stats[1:]:
        out = torch.maximum(out, s)
    return out


def rebuild(tensors: list[Tensor], mode: str, part: str, alpha: float, absmax: Optional[list]) -> Tensor:
    """Compile-cache recipe: the quantized tensor ``part`` of ``cat(tensors)`` under ``mode`` (read-only on the
    sources)."""
    w = tensors[0] if len(tensors) == 1 else torch.cat([t.detach() for t in tensors], 0)
    a = torch.tensor(absmax, dtype=torch.float32) if absmax is not None else None
    return MODES[mode].quantize(w, a, alpha)[part]


MOE_RECIPE = "quantize_moe"  # DERIVED_META op name of a quantized expert tensor (rebuilt by :func:`rebuild_moe`)


def quantize_experts(w: Tensor, mode: str) -> dict[str, Tensor]:
    """``w [E, N, K]`` -> {"weight": int8 / E4M3 ``[E, N, K]``, "scale": fp32 ``[E, N]``}: the mode's weight
    quantizer on every (expert, output channel) row, as for a linear."""
    E, N, K = w.shape
    parts = MODES[mode].quantize(w.reshape(E * N, K), None, 0.0)
    return {"weight": parts["weight"].reshape(E, N, K), "scale": parts["weight_scale"].reshape(E, N)}


def rebuild_moe(tensors: list[Tensor], steps: list, mode: str, part: str, cut: Optional[list] = None) -> Tensor:
    """Compile-cache recipe: ``part`` of the quantized expert tensor that ``steps`` view out of the model's stacked
    tensor (``match_moe.moe_view``); ``cut``: ``[dim, [[start, length], ...]]``, the rank's tensor-parallel cut of
    that view, taken before quantizing (a rank's experts are quantized as the rank holds them)."""
    from autodeploy.passes.match_moe import moe_view
    from autodeploy.passes.shard_tensor_parallel import WeightShard

    w = moe_view(tensors, steps)
    if cut is not None:
        w = WeightShard(cut[0], [tuple(r) for r in cut[1]]).take(w)
    return quantize_experts(w, mode)[part]


DERIVE_OPS = {RECIPE: rebuild, MOE_RECIPE: rebuild_moe}


def _attach(gm: fx.GraphModule, name: str, tensor: Tensor, recipe: tuple, like: fx.Node, before: fx.Node) -> fx.Node:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    while hasattr(gm, base):
        base += "_"
    gm.register_buffer(base, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(base)
    node.meta[DERIVED_META] = recipe
    mode = getattr(val(like), "fake_mode", None)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def _drop_attr(gm: fx.GraphModule, target: str) -> None:
    """Free the float weight the graph no longer reads (the caller's model may still hold it), and the graph's
    other names for its storage that nothing reads: fuse_gemms leaves each source linear's parameter as a row
    view of the fused weight, and one such view would keep the whole float storage alive beside its int8/fp8
    copy."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    if target in read:
        return
    try:
        storage = storage_id(getattr_path(gm, target))
    except AttributeError:
        return
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name in {n for n, t in named if n not in read and storage_id(t) == storage} | {target}:
        owner, _, leaf = name.rpartition(".")
        try:
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
        except AttributeError:
            pass


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _heads(gm: fx.GraphModule) -> set[fx.Node]:
    """The linears that produce the output with no other linear after them: the LM head (under any name, tied
    or not; a shape test would also catch a q/k/v GEMM whose width happens to equal the vocabulary)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    heads, seen, stack = set(), set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_op(n, aten.linear) or quant.is_quantized_linear(n):
            heads.add(n)
        else:
            stack.extend(n.all_input_nodes)
    return heads


def _stem(target: str) -> str:
    """``m.model.layers.0.self_attn.o_proj.weight`` -> ``model.layers.0.self_attn.o_proj`` (buffer names)."""
    target = _short(target)
    return target[:-len(".weight")] if target.endswith(".weight") else target


def _short(target: str) -> str:
    return target[2:] if target.startswith("m.") else target


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _prequantized_report(gm: fx.GraphModule, ctx: Any, cfg: QuantizationConfig) -> PassResult:
    quantized = [n for n in gm.graph.nodes if quant.is_quantized_linear(n)]
    left = [n for n in gm.graph.nodes if is_op(n, aten.linear)]
    pre = cfg.prequantized or {}
    nbytes = sum(_nbytes(getattr_path(gm, n.kwargs.get("weight", n.args[1] if len(n.args) > 1 else None).target))
                 for n in quantized)
    summary = (f"{pre.get('mode')} from a {pre.get('format')} checkpoint (stored scales kept): {len(quantized)} "
               f"linears quantized, {len(left)} in full precision (the checkpoint's ignore list); quantized weights "
               f"{_mib(nbytes)}")
    ctx.report.quantization = summary
    return PassResult(0, [summary])


_MOE_WEIGHTS = (("w_gate", "s_gate"), ("w_up", "s_up"), ("w_down", "s_down"))


def _moe_source(gm: fx.GraphModule, w_node: Any) -> Optional[tuple[str, list, Optional[list]]]:
    """(model tensor, view steps, tensor-parallel cut or None) an experts weight get_attr is: a view of a model
    tensor as the model holds it, or the rank's cut of one (``gm.meta["tensor_parallel_plan"]``); None when it is
    computed."""
    if not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return None
    recipe = w_node.meta.get(DERIVED_META)
    if recipe is None:
        source, steps = w_node.target, []
    elif recipe[0] == "moe_view":
        source, steps = recipe[1][0], recipe[2]
    else:
        return None
    if not source.startswith("m."):
        return None
    from autodeploy.passes.match_moe import moe_view

    try:
        whole = moe_view([getattr_path(gm, source)], steps)
    except (AttributeError, RuntimeError):
        return None
    shape = tuple(getattr_path(gm, w_node.target).shape)
    if tuple(whole.shape) == shape:
        return source, steps, None
    plan = gm.meta.get("tensor_parallel_plan")
    shard = getattr(plan, "weights", {}).get(w_node.target) if plan is not None else None
    if shard is None:
        return None
    cut_shape = list(whole.shape)
    cut_shape[shard.dim] = sum(n for _, n in shard.ranges)
    return (source, steps, [shard.dim, [list(r) for r in shard.ranges]]) if tuple(cut_shape) == shape else None


def _moe_skip_reason(gm: fx.GraphModule, node: fx.Node, cfg: QuantizationConfig) -> Optional[str]:
    """Why a ``moe_experts`` layer keeps float experts, or None to quantize it."""
    if cfg.mode not in moe_ops.QUANT_MODES:
        return (f"{cfg.mode!r} has no quantized-experts form (experts take {sorted(moe_ops.QUANT_MODES)}); "
                "the experts stay in full precision")
    args = moe_ops.moe_inputs(node)
    for name, _ in _MOE_WEIGHTS:
        w_node = args[name]
        src = _moe_source(gm, w_node)
        if src is None:
            return f"{name} is not a model tensor (computed in the graph)"
        w = getattr_path(gm, w_node.target)
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{name} is not a float tensor ({w.dtype})"
        hit = next((p for p in cfg.ignore if re.search(p, src[0])), None)
        if hit is not None:
            return f"{name} matches ignore pattern {hit!r}"
        if any(u is not node for u in w_node.users):
            return f"{name} is also read elsewhere (quantizing would keep both copies)"
    return None


def _quantize_moe(gm: fx.GraphModule, node: fx.Node, mode: str) -> tuple[int, int]:
    """Replace one ``moe_experts`` node by ``moe_experts_quant`` on quantized expert weights (arguments by name);
    returns (float bytes, quantized bytes)."""
    args = moe_ops.moe_inputs(node)
    kwargs = {k: v for k, v in args.items() if k not in dict(_MOE_WEIGHTS)}
    before = after = 0
    for name, scale_name in _MOE_WEIGHTS:
        w_node = args[name]
        source, steps, cut = _moe_source(gm, w_node)
        w = getattr_path(gm, w_node.target)
        parts = quantize_experts(w, mode)
        for part, arg_name in (("weight", name), ("scale", scale_name)):
            t = parts[part].to(w.device)
            recipe = (MOE_RECIPE, [source], [list(x) for x in steps], mode, part, cut)
            kwargs[arg_name] = _attach(gm, f"quant_{_stem(source)}_{name}_{part}", t, recipe, args["hidden"], node)
            after += _nbytes(t)
        before += _nbytes(w)
    kwargs["mode"] = mode
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(torch.ops.autodeploy.moe_experts_quant.default, (), kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    for name, _ in _MOE_WEIGHTS:
        w_node = args[name]
        if w_node in gm.graph.nodes and not w_node.users:
            target = w_node.target
            gm.graph.erase_node(w_node)
            _drop_attr(gm, target)
    return before, after


@register_pass("quantize_linears")
def quantize_linears(gm: fx.GraphModule, ctx: Any) -> PassResult:
    cfg: Optional[QuantizationConfig] = getattr(ctx, "quantization", None)
    if cfg is None:
        return PassResult(0, ["off (compile(..., quantization=...) not set)"])
    if cfg.prequantized:
        return _prequantized_report(gm, ctx, cfg)
    mode = MODES[cfg.mode]
    heads = _heads(gm)
    done, skipped = 0, []
    before_bytes = after_bytes = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.linear):
            continue
        w_node = node.args[1]
        why = _skip_reason(gm, node, cfg, heads)
        if why is not None:
            label = _short(w_node.target) if isinstance(w_node, fx.Node) and w_node.op == "get_attr" else node.name
            skipped.append((label, why))
            continue
        sources = _sources(w_node)
        w = getattr_path(gm, w_node.target)
        absmax = _absmax(cfg, sources) if mode.uses_calibration else None
        tensors = mode.quantize(w, absmax, cfg.smoothing_alpha)
        absmax_json = absmax.tolist() if absmax is not None else None
        kwargs: dict[str, Any] = {}
        for part, t in tensors.items():
            t = t.to(w.device)
            recipe = (RECIPE, sources, mode.name, part, float(cfg.smoothing_alpha), absmax_json)
            kwargs[part] = _attach(gm, f"quant_{_stem(w_node.target)}_{part}", t, recipe, node.args[0], node)
            after_bytes += _nbytes(t)
        before_bytes += _nbytes(w)
        bias = arg(node, 2, "bias")
        if bias is not None:
            kwargs["bias"] = bias
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(mode.op, (node.args[0],), kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not w_node.users:
            gm.graph.erase_node(w_node)
            _drop_attr(gm, w_node.target)
        done += 1
    moe_done = 0
    for node in [n for n in gm.graph.nodes if is_op(n, torch.ops.autodeploy.moe_experts)]:
        why = _moe_skip_reason(gm, node, cfg)
        if why is not None:
            skipped.append((node.name, f"MoE experts: {why}"))
            continue
        b, a = _quantize_moe(gm, node, cfg.mode)
        before_bytes, after_bytes, moe_done = before_bytes + b, after_bytes + a, moe_done + 1
    if done == 0 and moe_done == 0 and not skipped:
        raise UnsupportedModelError(f"quantization={cfg.mode!r}: the graph has no linear layers to quantize")
    calib = f", SmoothQuant from {len(cfg.calibration)} calibration prompts" if cfg.act_absmax else ""
    moe = f" and {moe_done} MoE experts layers" if moe_done else ""
    summary = (f"{mode.name}: {done} linears{moe} quantized ({mode.summary}{calib}), {len(skipped)} skipped; weights "
               f"{_mib(before_bytes)} -> {_mib(after_bytes)} (saved {_mib(before_bytes - after_bytes)})")
    ctx.report.quantization = summary
    notes = [summary] + [f"kept {name}: {why}" for name, why in skipped]
    log.info("%s", summary)
    return PassResult(done + moe_done, notes)
