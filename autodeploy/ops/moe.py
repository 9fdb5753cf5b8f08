"""Canonical MoE experts op ``autodeploy::moe_experts`` and its plain-torch reference.

The op is the experts half of an MoE block: routing (softmax/sigmoid, top-k, renormalisation, group limits,
routed scaling) stays as ordinary graph ops before it, shared experts stay ordinary linears. Arguments by name
(the tensor-parallel sharding rule and the backends read them by name)::

    moe_experts(hidden[T,H], topk_ids[T,K] int64, topk_weights[T,K], w_gate[E,I,H], w_up[E,I,H], w_down[E,H,I],
                b_gate[E,I]?, b_up[E,I]?, b_down[E,H]?, activation="silu", activation_args=None) -> [T,H]

    out[t] = sum_k topk_weights[t,k] * (W_down[e] @ act(W_gate[e] @ x + b_gate[e], W_up[e] @ x + b_up[e]) + b_down[e])
    with e = topk_ids[t,k]

Weights may be any strided views (the matcher hands over views of the model's stacked tensors, never copies).
Numerics follow HF's grouped experts: each projection's output is rounded to the weight dtype, the activation
runs in that dtype, and the weighted sum over the K picks accumulates in fp32 before the cast to ``hidden``'s
dtype. Activations come from :data:`ACTIVATIONS` (name -> gated function and its named arguments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from autodeploy.errors import AutoDeployError


class MoEError(AutoDeployError, ValueError):
    """Bad inputs to ``moe_experts`` (shapes, dtypes, an unknown activation), named by argument."""


@dataclass(frozen=True)
class GatedActivation:
    """``fn(gate, up, *args) -> inter``; ``arg_names`` name the floats ``activation_args`` carries, in order.
    ``signature``: ATen op names whose presence in an HF experts graph makes this activation a candidate."""

    fn: Callable[..., Tensor]
    arg_names: tuple[str, ...] = ()
    signature: tuple[str, ...] = ()


def _swiglu_clamped(gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss: gate clamped above, up clamped both ways, ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


ACTIVATIONS: dict[str, GatedActivation] = {
    "silu": GatedActivation(lambda g, u: torch.nn.functional.silu(g) * u, signature=("silu",)),
    "gelu": GatedActivation(lambda g, u: torch.nn.functional.gelu(g) * u, signature=("gelu",)),
    "gelu_tanh": GatedActivation(lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u,
                                 signature=("gelu",)),
    "relu": GatedActivation(lambda g, u: torch.relu(g) * u, signature=("relu",)),
    "swiglu_clamped": GatedActivation(_swiglu_clamped, ("alpha", "limit"), signature=("sigmoid", "clamp")),
}


def register_activation(name: str, act: GatedActivation) -> None:
    """Add a gated activation (kernels that do not know it refuse the layer by name, see ``kernel_supports``)."""
    if name in ACTIVATIONS and ACTIVATIONS[name] != act:
        raise MoEError(f"MoE activation {name!r} is already registered")
    ACTIVATIONS[name] = act


def activation_fn(activation: str, activation_args: Optional[Sequence[float]]) -> Callable[[Tensor, Tensor], Tensor]:
    """The gated function with its arguments bound; unknown names or a wrong argument count are refused."""
    act = ACTIVATIONS.get(activation)
    if act is None:
        raise MoEError(f"moe_experts: unknown activation {activation!r} (registered: {sorted(ACTIVATIONS)})")
    args = tuple(activation_args or ())
    if len(args) != len(act.arg_names):
        raise MoEError(f"moe_experts: activation {activation!r} takes arguments {act.arg_names}, got {list(args)}")
    return lambda g, u: act.fn(g, u, *args)


def check_inputs(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                 w_down: Tensor, b_gate: Optional[Tensor], b_up: Optional[Tensor], b_down: Optional[Tensor]) -> None:
    """Shape/dtype contract of the op, each violation named by argument (shared by the reference and kernels)."""
    if hidden.dim() != 2:
        raise MoEError(f"moe_experts: hidden must be [T, H], got shape {tuple(hidden.shape)}")
    T, H = hidden.shape
    if w_gate.dim() != 3:
        raise MoEError(f"moe_experts: w_gate must be [E, I, H], got shape {tuple(w_gate.shape)}")
    E, I, _ = w_gate.shape
    if tuple(w_gate.shape) != (E, I, H) or tuple(w_up.shape) != (E, I, H):
        raise MoEError(f"moe_experts: w_gate/w_up must be [E, I, H] = [{E}, {I}, {H}], got "
                       f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (E, H, I):
        raise MoEError(f"moe_experts: w_down must be [E, H, I] = [{E}, {H}, {I}], got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise MoEError(f"moe_experts: topk_ids and topk_weights must both be [T={T}, K], got "
                       f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise MoEError(f"moe_experts: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    for name, b, n in (("b_gate", b_gate, I), ("b_up", b_up, I), ("b_down", b_down, H)):
        if b is not None and tuple(b.shape) != (E, n):
            raise MoEError(f"moe_experts: {name} must be [E, {n}] = [{E}, {n}], got {tuple(b.shape)}")
    if not (w_gate.dtype == w_up.dtype == w_down.dtype):
        raise MoEError(f"moe_experts: expert weights differ in dtype ({w_gate.dtype}, {w_up.dtype}, {w_down.dtype})")


def _expert(x: Tensor, e: int, w_gate, w_up, w_down, b_gate, b_up, b_down, act) -> Tensor:
    """One expert on rows ``x``; each projection output is rounded to the weight dtype, as HF's GEMMs are."""
    x = x.to(w_gate.dtype)
    g = torch.nn.functional.linear(x, w_gate[e], None if b_gate is None else b_gate[e])
    u = torch.nn.functional.linear(x, w_up[e], None if b_up is None else b_up[e])
    return torch.nn.functional.linear(act(g, u), w_down[e], None if b_down is None else b_down[e])


def _combine_dtype(hidden: Tensor, topk_weights: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(hidden.dtype, topk_weights.dtype), torch.float32)


def _grouped(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, num_experts: int, expert) -> Tensor:
    """Tokens grouped by expert, ``expert(rows, e)`` on each expert that has tokens; one host sync (the counts)."""
    T, K = topk_ids.shape
    E = num_experts
    out = torch.zeros(hidden.shape, dtype=_combine_dtype(hidden, topk_weights), device=hidden.device)
    flat = topk_ids.reshape(-1).long()
    if T == 0:
        return out.to(hidden.dtype)
    if bool(((flat < 0) | (flat >= E)).any()):
        raise MoEError(f"moe_experts: topk_ids must lie in [0, {E}), got values {flat.min().item()}..{flat.max().item()}")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // K
        y = expert(hidden[tok], e)
        w = topk_weights.reshape(-1)[pairs].to(out.dtype)
        out.index_add_(0, tok, y.to(out.dtype) * w[:, None])
    return out.to(hidden.dtype)


def _dense(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, num_experts: int, expert) -> Tensor:
    """Every expert on every token, masked by the routing: no host sync, ``E / K`` times the work."""
    out = torch.zeros(hidden.shape, dtype=_combine_dtype(hidden, topk_weights), device=hidden.device)
    for e in range(num_experts):
        w = (topk_weights.to(out.dtype) * (topk_ids == e)).sum(-1, keepdim=True)
        out += expert(hidden, e).to(out.dtype) * w
    return out.to(hidden.dtype)


def _capturing(hidden: Tensor) -> bool:
    return hidden.is_cuda and torch.cuda.is_current_stream_capturing()


def moe_reference_grouped(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate=None, b_up=None,
                          b_down=None, activation="silu", activation_args=None) -> Tensor:
    """Tokens grouped by expert, one GEMM triple per expert that has tokens. Reads the per-expert counts on the
    host (one sync), so it is the reference outside CUDA-graph capture."""
    check_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down)
    act = activation_fn(activation, activation_args)
    return _grouped(hidden, topk_ids, topk_weights, w_gate.shape[0],
                    lambda x, e: _expert(x, e, w_gate, w_up, w_down, b_gate, b_up, b_down, act))


def moe_reference_dense(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                        activation="silu", activation_args=None) -> Tensor:
    """Every expert on every token, masked by the routing: no host sync (capturable in a CUDA graph) at
    ``E / K`` times the work. Same roundings as :func:`moe_reference_grouped`."""
    check_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down)
    act = activation_fn(activation, activation_args)
    return _dense(hidden, topk_ids, topk_weights, w_gate.shape[0],
                  lambda x, e: _expert(x, e, w_gate, w_up, w_down, b_gate, b_up, b_down, act))


def moe_reference(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                  activation="silu", activation_args=None) -> Tensor:
    """The torch reference: grouped, except while a CUDA graph is being captured (then dense, no sync)."""
    fn = moe_reference_dense if _capturing(hidden) else moe_reference_grouped
    return fn(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
              activation_args)


@torch.library.custom_op("autodeploy::moe_experts", mutates_args=())
def moe_experts(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                w_down: Tensor, b_gate: Optional[Tensor] = None, b_up: Optional[Tensor] = None,
                b_down: Optional[Tensor] = None, activation: str = "silu",
                activation_args: Optional[list[float]] = None) -> Tensor:
    return moe_reference(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                         activation_args)


@moe_experts.register_fake
def _moe_experts_fake(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                      activation="silu", activation_args=None):
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


MOE_ARG_NAMES = ("hidden", "topk_ids", "topk_weights", "w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down",
                 "activation", "activation_args")


def moe_inputs(node) -> dict:
    """A ``moe_experts`` call node's arguments by name (defaults filled in): passes read the op by name."""
    values = dict(zip(MOE_ARG_NAMES, node.args))
    values.update(node.kwargs)
    defaults = {"b_gate": None, "b_up": None, "b_down": None, "activation": "silu", "activation_args": None}
    return {name: values.get(name, defaults.get(name)) for name in MOE_ARG_NAMES}


# -- quantized experts: ``compile(quantization="int8-weight" | "fp8" | "int8")`` -----------------------------------
# ``moe_experts_quant`` is ``moe_experts`` on int8 / E4M3 expert weights with one fp32 scale per (expert, output
# channel): ``s_gate[E,I]``, ``s_up[E,I]``, ``s_down[E,H]``. Each projection is the mode's quantized linear
# (ops/quant.py: ``int8_weight_linear``, ``fp8_linear`` with its dynamic per-token activation scales, or W8A8
# ``int8_linear`` with dynamic per-token scales and no smoothing: calibration sees the linears' inputs, not each
# expert's), its output
# in the model dtype as the float op's are; the activation and the weighted combine are the float op's. A separate
# op (not optional arguments of ``moe_experts``): a pass or kernel written for float experts never meets int8
# weights.


def _int8_weight_proj(x: Tensor, w: Tensor, s: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.ops.autodeploy.int8_weight_linear(x, w, s, b)


def _fp8_proj(x: Tensor, w: Tensor, s: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.ops.autodeploy.fp8_linear(x, w, s, None, b)


def _int8_proj(x: Tensor, w: Tensor, s: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.ops.autodeploy.int8_linear(x, w, s, None, b)


# mode -> (weight dtype, projection(x, weight [N, K], scale [N], bias [N] or None) -> [rows, N] in x's dtype)
QUANT_MODES: dict[str, tuple[torch.dtype, Callable]] = {
    "int8-weight": (torch.int8, _int8_weight_proj),
    "fp8": (torch.float8_e4m3fn, _fp8_proj),
    "int8": (torch.int8, _int8_proj),
}


def check_quant_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate, b_up,
                       b_down, mode: str) -> None:
    """:func:`check_inputs` plus the mode, the weights' storage dtype and the scales' shapes, each named."""
    check_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if mode not in QUANT_MODES:
        raise MoEError(f"moe_experts_quant: unknown mode {mode!r} (known: {sorted(QUANT_MODES)})")
    if w_gate.dtype != QUANT_MODES[mode][0]:
        raise MoEError(f"moe_experts_quant: mode {mode!r} takes {QUANT_MODES[mode][0]} weights, got {w_gate.dtype}")
    E, I, H = w_gate.shape
    for name, sc, n in (("s_gate", s_gate, I), ("s_up", s_up, I), ("s_down", s_down, H)):
        if tuple(sc.shape) != (E, n) or not sc.is_floating_point():
            raise MoEError(f"moe_experts_quant: {name} must be a float [E, {n}] = [{E}, {n}] tensor, got "
                           f"{sc.dtype} {tuple(sc.shape)}")


def _expert_quant(x, e, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate, b_up, b_down, act, proj) -> Tensor:
    pick = lambda b: None if b is None else b[e]  # noqa: E731
    g = proj(x, w_gate[e], s_gate[e], pick(b_gate))
    u = proj(x, w_up[e], s_up[e], pick(b_up))
    return proj(act(g, u), w_down[e], s_down[e], pick(b_down))


def moe_quant_reference(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate=None,
                        b_up=None, b_down=None, mode="int8-weight", activation="silu",
                        activation_args=None) -> Tensor:
    """The torch reference of ``moe_experts_quant``: grouped by expert, dense while a CUDA graph is captured."""
    check_quant_inputs(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate, b_up,
                       b_down, mode)
    act = activation_fn(activation, activation_args)
    proj = QUANT_MODES[mode][1]
    fn = _dense if _capturing(hidden) else _grouped
    return fn(hidden, topk_ids, topk_weights, w_gate.shape[0],
              lambda x, e: _expert_quant(x, e, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate, b_up, b_down,
                                         act, proj))


@torch.library.custom_op("autodeploy::moe_experts_quant", mutates_args=())
def moe_experts_quant(hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                      w_down: Tensor, s_gate: Tensor, s_up: Tensor, s_down: Tensor, b_gate: Optional[Tensor] = None,
                      b_up: Optional[Tensor] = None, b_down: Optional[Tensor] = None, mode: str = "int8-weight",
                      activation: str = "silu", activation_args: Optional[list[float]] = None) -> Tensor:
    return moe_quant_reference(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate,
                               b_up, b_down, mode, activation, activation_args)


@moe_experts_quant.register_fake
def _moe_experts_quant_fake(hidden, topk_ids, topk_weights, w_gate, w_up, w_down, s_gate, s_up, s_down, b_gate=None,
                            b_up=None, b_down=None, mode="int8-weight", activation="silu", activation_args=None):
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


MOE_QUANT_ARG_NAMES = ("hidden", "topk_ids", "topk_weights", "w_gate", "w_up", "w_down", "s_gate", "s_up", "s_down",
                       "b_gate", "b_up", "b_down", "mode", "activation", "activation_args")


def moe_quant_inputs(node) -> dict:
    """A ``moe_experts_quant`` call node's arguments by name (defaults filled in)."""
    values = dict(zip(MOE_QUANT_ARG_NAMES, node.args))
    values.update(node.kwargs)
    defaults = {"b_gate": None, "b_up": None, "b_down": None, "mode": "int8-weight", "activation": "silu",
                "activation_args": None}
    return {name: values.get(name, defaults.get(name)) for name in MOE_QUANT_ARG_NAMES}


# -- export: experts modules whose HF forward torch.export cannot trace -----------------------------------------
# HF DBRX loops over ``expert_hit = (...).nonzero()``: a loop whose trip count is data (export fails with a
# data-dependent-guard error). Its forward is swapped for one ``moe_experts`` call while exporting. transformers
# class name -> fn(module, hidden_states, top_k_index, top_k_weights) -> output, or None where the module's
# configuration has no canonical form (then the HF forward stays, and export reports its own error).
_ACT_CLASSES = {"SiLUActivation": "silu", "SiLU": "silu", "GELUActivation": "gelu", "GELU": "gelu",
                "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "ReLU": "relu"}


def _dbrx_forward(module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    mlp = module.mlp
    E, I, H = module.num_experts, module.ffn_hidden_size, module.hidden_size
    act = _ACT_CLASSES[type(mlp.activation_fn).__name__]
    w_gate, w_up = mlp.w1.view(E, I, H), mlp.v1.view(E, I, H)
    w_down = mlp.w2.view(E, I, H).transpose(1, 2)  # DBRX computes ``h @ w2[e]``: down is w2[e] transposed
    x = hidden_states.reshape(-1, H)
    out = torch.ops.autodeploy.moe_experts(x, top_k_index, top_k_weights, w_gate, w_up, w_down,
                                           activation=act)
    return out.view(hidden_states.shape[0], -1, H)


def _dbrx_ok(module) -> bool:
    return type(getattr(getattr(module, "mlp", None), "activation_fn", None)).__name__ in _ACT_CLASSES


# class name -> (applies(module), forward)
TRACEABLE_EXPERTS: dict[str, tuple[Callable, Callable]] = {"DbrxExperts": (_dbrx_ok, _dbrx_forward)}


class traceable_experts:
    """Context manager: while exporting ``model``, experts modules listed in :data:`TRACEABLE_EXPERTS` run
    their traceable forward (instance attribute, restored on exit; the class is never touched)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.patched: list[torch.nn.Module] = []

    def __enter__(self) -> "traceable_experts":
        import types

        for module in self.model.modules():
            entry = TRACEABLE_EXPERTS.get(type(module).__name__)
            if entry is not None and entry[0](module) and "forward" not in module.__dict__:
                module.forward = types.MethodType(entry[1], module)
                self.patched.append(module)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.patched:
            del module.forward
        self.patched.clear()
