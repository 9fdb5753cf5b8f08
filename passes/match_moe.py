"""Replace HF's MoE experts with the canonical ``autodeploy::moe_experts`` op.

transformers 5.x runs every family's experts through one module interface, ``experts(hidden[T,H],
top_k_index[T,K], top_k_weights[T,K]) -> [T,H]`` over stacked 3-D weights (``@use_experts_implementation``: the
grouped_mm, batched_mm or per-expert forms, whichever export traced). The pass finds each such module in the
exported graph by its ``nn_module_stack`` (a class named ``*Experts``), cuts out its nodes, and tries the op's
layouts on the module's own weights (gate/up concatenated or interleaved, transposed or not, biases, every
registered activation whose ATen ops appear in the region). A candidate is taken only if it reproduces the cut-out
region on probe inputs: ordinary ones, and inputs scaled so activations saturate and clamps engage. With deferred
weights (a tensor-parallel rank that reads its shard later) the probes run on seeded random weights
(``graph.probe_weights``): the identity checked holds for any weights. The fit with
the smallest error wins. Anything else is left as is, with the reason in ``explain()``: what cannot be shown equal
is never rewritten. Routing (softmax/sigmoid, top-k, renormalisation, group limits, scaling) and shared experts
stay ordinary graph ops.

Weights are views of the model's tensors (no copies); each new attribute records its view recipe
(``DERIVED_META = ("moe_view", [source], steps)``, :data:`DERIVE_OPS`) for the compile cache. ``moe_experts``
nodes already in the graph (emitted at export for DBRX, see ``autodeploy.ops.moe.traceable_experts``) get the
same treatment for their weight arguments, so every op reads get_attr weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import fx

from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.probe_weights import probe_weights
from autodeploy.graph.utils import DERIVED_META, aten, getattr_path, is_op, static_int, val
from autodeploy.numerics import rel_rms
from autodeploy.ops.moe import ACTIVATIONS, MoEError, moe_inputs, moe_reference_grouped

log = logging.getLogger(__name__)

OP = torch.ops.autodeploy.moe_experts.default
ATTR_PREFIX = "moe"
WEIGHT_ARGS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
# Probe error a candidate must stay under (relative RMS against the HF region), by weight dtype.
_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_TOL_HALF = 3e-2


# -- view recipes (what the compile cache replays on the caller's tensors) --------------------------------------
def apply_steps(t: torch.Tensor, steps: Sequence[Sequence[Any]]) -> torch.Tensor:
    """``steps``: ``("slice", dim, start, stop, step)``, ``("transpose", a, b)``, ``("view", shape)``."""
    for step in steps:
        kind, *a = step
        if kind == "slice":
            dim, start, stop, stride = a
            t = t[(slice(None),) * dim + (slice(start, stop, stride),)]
        elif kind == "transpose":
            t = t.transpose(a[0], a[1])
        elif kind == "view":
            t = t.view(list(a[0]))
        else:
            raise MoEError(f"unknown MoE weight view step {kind!r}")
    return t


def moe_view(tensors: list[torch.Tensor], steps: list) -> torch.Tensor:
    """Compile-cache recipe: the view of the one source tensor (register with ``compile_cache._DERIVE_OPS``)."""
    return apply_steps(tensors[0].detach(), steps)


DERIVE_OPS = {"moe_view": moe_view}


# -- candidate layouts ----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One way of reading the module's weights as the op's arguments: name -> (source target, view steps)."""

    label: str
    views: dict[str, tuple[str, list]]
    activation: str
    activation_args: Optional[list[float]]


def _view_tensors(views: dict[str, tuple[str, list]], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(WEIGHT_ARGS)
    for name, (src, steps) in views.items():
        out[name] = apply_steps(tensors[src], steps)
    return out


def _halves(split: str, dim: int, n: int) -> tuple[list, list]:
    """Steps taking the gate and the up half of a stacked gate/up dim of size ``2n``."""
    if split == "interleaved":
        return [("slice", dim, 0, None, 2)], [("slice", dim, 1, None, 2)]
    first, second = [("slice", dim, 0, n, 1)], [("slice", dim, n, 2 * n, 1)]
    return (first, second) if split == "gate_first" else (second, first)


def _layouts(rel: dict[str, torch.Tensor], H: int) -> tuple[list[tuple], str]:
    """(label, views) layouts the module's weights (by name relative to the module) admit, or ([], why not)."""
    targets = {name: name for name in rel}
    gu, down = rel.get("gate_up_proj"), rel.get("down_proj")
    if down is None or down.dim() != 3:
        return [], "no stacked 3-D down_proj weight"
    gub, db = rel.get("gate_up_proj_bias"), rel.get("down_proj_bias")
    out = []
    if gu is not None and gu.dim() == 3:
        E = gu.shape[0]
        for transposed in (False, True):
            h_dim, n_dim = (1, 2) if transposed else (2, 1)
            if gu.shape[h_dim] != H or gu.shape[n_dim] % 2:
                continue
            I = gu.shape[n_dim] // 2
            want_down = (E, I, H) if transposed else (E, H, I)
            if tuple(down.shape) != want_down:
                continue
            if gub is not None and tuple(gub.shape) != (E, 2 * I):
                continue
            for split in ("gate_first", "up_first", "interleaved"):
                g, u = _halves(split, n_dim, I)
                t = [("transpose", 1, 2)] if transposed else []
                views = {"w_gate": (targets["gate_up_proj"], g + t), "w_up": (targets["gate_up_proj"], u + t),
                         "w_down": (targets["down_proj"], t)}
                if gub is not None:
                    bg, bu = _halves(split, 1, I)
                    views["b_gate"], views["b_up"] = (targets["gate_up_proj_bias"], bg), (targets["gate_up_proj_bias"], bu)
                if db is not None:
                    views["b_down"] = (targets["down_proj_bias"], [])
                out.append((f"gate_up {split}{' transposed' if transposed else ''}", views))
        return out, "" if out else f"gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} fit no [E,I,H] layout"
    gate, up = rel.get("gate_proj"), rel.get("up_proj")
    if gate is None or up is None:
        return [], "no stacked gate/up weights (ungated experts have no canonical form)"
    for transposed in (False, True):
        t = [("transpose", 1, 2)] if transposed else []
        g = apply_steps(gate, t)
        if g.dim() != 3 or g.shape[2] != H or tuple(apply_steps(up, t).shape) != tuple(g.shape):
            continue
        if tuple(apply_steps(down, t).shape) != (g.shape[0], H, g.shape[1]):
            continue
        out.append((f"gate/up{' transposed' if transposed else ''}",
                    {"w_gate": (targets["gate_proj"], t), "w_up": (targets["up_proj"], t),
                     "w_down": (targets["down_proj"], t)}))
    return out, "" if out else "gate_proj/up_proj/down_proj fit no [E,I,H] layout"


def _op_names(nodes: list[fx.Node]) -> set[str]:
    names = set()
    for n in nodes:
        packet = getattr(n.target, "overloadpacket", None)
        names.add(getattr(packet, "__name__", str(n.target)))
    return names


def _scalar_args(nodes: list[fx.Node], op, pos: int) -> list[float]:
    out = []
    for n in nodes:
        if is_op(n, op) and len(n.args) > pos and isinstance(n.args[pos], (int, float)) and not isinstance(n.args[pos], bool):
            out.append(float(n.args[pos]))
    return out


def _swiglu_args(nodes: list[fx.Node]) -> list[list[float]]:
    """(alpha, limit) candidates: the scalar multiplying the gate before its sigmoid, the clamps' upper bound."""
    alphas = []
    for n in nodes:
        if is_op(n, aten.sigmoid) and is_op(n.args[0], aten.mul):
            alphas += [float(a) for a in n.args[0].args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    limits = _scalar_args(nodes, aten.clamp, 2) + _scalar_args(nodes, aten.clamp_max, 1)
    return [[a, lim] for a in dict.fromkeys(alphas) for lim in dict.fromkeys(limits)]


# activation name -> candidate argument lists read off the region (default: no arguments)
ARG_FINDERS = {"swiglu_clamped": _swiglu_args}


def _activations(nodes: list[fx.Node]) -> list[tuple[str, Optional[list[float]]]]:
    present = _op_names(nodes)
    out = []
    for name, act in ACTIVATIONS.items():
        if not set(act.signature) <= present:
            continue
        finder = ARG_FINDERS.get(name)
        for args in (finder(nodes) if finder else [None]):
            out.append((name, args))
    return out


# -- regions --------------------------------------------------------------------------------------------------
def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', t)}"


def experts_regions(gm: fx.GraphModule) -> dict[str, tuple[str, list[fx.Node]]]:
    """Module path -> (class name, its call nodes in graph order) for every ``*Experts`` module in the graph."""
    regions: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
            continue  # size arithmetic: export shares it across layers, so it stays outside (an input)
        for path, typ in (node.meta.get("nn_module_stack") or {}).values():
            cls = _type_name(typ).rsplit(".", 1)[-1]
            if cls.endswith("Experts"):
                regions.setdefault(path, (cls, []))[1].append(node)
                break
    return regions


@dataclass
class Region:
    path: str
    cls: str
    nodes: list[fx.Node]
    output: fx.Node
    hidden: fx.Node
    ids: fx.Node
    weights: fx.Node
    attrs: dict[str, str]  # relative name -> get_attr target
    inputs: list[fx.Node]  # non-get_attr inputs, in probe-call order


def _written_args(node: fx.Node) -> list[fx.Node]:
    """Graph values an in-place/out op writes (``index_put_``'s self, ``add_``'s self...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, fx.Node):
                out.append(v)
    return out


def _region(gm: fx.GraphModule, path: str, cls: str, nodes: list[fx.Node]) -> tuple[Optional[Region], str]:
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        return None, f"{len(outputs)} values leave the module (expected one output)"
    inputs: list[fx.Node] = []
    for n in nodes:
        for i in n.all_input_nodes:
            if i not in inside and i not in inputs:
                inputs.append(i)
        if any(a not in inside for a in _written_args(n)):
            return None, f"{n.name} writes to a value from outside the module (cutting it out would drop that)"
    attrs = {}
    tensors, syms = [], []
    for i in inputs:
        if i.op == "get_attr":
            rel = i.target[len(path) + 1:] if i.target.startswith(path + ".") else i.target
            attrs[rel] = i.target
        elif isinstance(val(i), torch.Tensor):
            tensors.append(i)
        elif isinstance(i.meta.get("val"), (torch.SymInt, int)):
            syms.append(i)
        else:
            return None, f"input {i.name} is neither a tensor nor a size"
    out = val(outputs[0])
    if out is None or out.dim() != 2:
        return None, "its output is not a [T, H] tensor"
    H = out.shape[1]
    ints = [t for t in tensors if not val(t).is_floating_point()]
    floats = [t for t in tensors if val(t).is_floating_point()]
    if len(ints) != 1 or len(floats) != 2:
        return None, ("it takes no top-k ids and weights (routing is folded into its inputs, which moe_experts "
                      "cannot express)" if not ints else "its inputs are not (hidden, top-k ids, top-k weights)")
    ids = ints[0]
    hidden = [f for f in floats if val(f).dim() == 2 and str(val(f).shape[1]) == str(H)]
    weights = [f for f in floats if val(f).dim() == 2 and str(val(f).shape) == str(val(ids).shape)]
    if len(hidden) != 1 or len(weights) != 1 or hidden[0] is weights[0] or val(ids).dim() != 2:
        return None, "its inputs are not hidden [T, H], top-k ids [T, K] and top-k weights [T, K]"
    if val(hidden[0]).dtype != out.dtype or str(val(hidden[0]).shape[0]) != str(out.shape[0]):
        return None, "its output is not shaped and typed like its hidden input"
    return Region(path, cls, nodes, outputs[0], hidden[0], ids, weights[0], attrs,
                  [hidden[0], ids, weights[0], *syms]), ""


def _probe_module(gm: fx.GraphModule, region: Region) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(region.inputs):
        env[node] = graph.placeholder(f"in_{i}")
    for target in region.attrs.values():
        node = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
        env[node] = graph.get_attr(target)
    for node in region.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[region.output])
    return fx.GraphModule(gm, graph)


def _sym_values(region: Region, T: int) -> Optional[list[int]]:
    """Values of the region's size inputs for a probe of ``T`` tokens: the one symbol of the token count that
    makes it ``T`` (the others 1). None if no assignment does."""
    t_dim = val(region.hidden).shape[0]
    syms = region.inputs[3:]
    if isinstance(t_dim, int):
        return None  # a static token count: the probe cannot change it
    expr = t_dim.node.expr
    free = sorted(expr.free_symbols, key=str)
    for s in free:
        subs = {x: (T if x == s else 1) for x in free}
        if int(expr.subs(subs)) != T:
            continue
        values = []
        for n in syms:
            v = n.meta["val"]
            if isinstance(v, int):
                values.append(v)
                continue
            e = v.node.expr
            r = e.subs({**{x: 1 for x in e.free_symbols}, **subs})
            if not r.is_Integer:
                return None
            values.append(int(r))
        return values
    return None


def _probe_inputs(region: Region, E: int, T: int, scale: float, gen: torch.Generator, device) -> list:
    hv, iv, wv = val(region.hidden), val(region.ids), val(region.weights)
    K = static_int(iv.shape[1])
    H = static_int(hv.shape[1])
    x = (torch.randn(T, H, generator=gen) * scale).to(device=device, dtype=hv.dtype)
    rows = [(torch.arange(K) + t * K) % E for t in range(T)]  # every expert used, distinct picks per token
    ids = torch.stack(rows)[torch.randperm(T, generator=gen)].to(device=device, dtype=iv.dtype)
    w = (torch.rand(T, K, generator=gen) * 0.9 + 0.1).to(device=device, dtype=wv.dtype)
    return [x, ids, w]


def _try_region(gm: fx.GraphModule, region: Region) -> tuple[Optional[Candidate], str]:
    tensors = {rel: getattr_path(gm, t) for rel, t in region.attrs.items()}
    H = static_int(val(region.hidden).shape[1])
    K = static_int(val(region.ids).shape[1])
    if H is None or K is None:
        return None, "hidden size or top-k is not static"
    layouts, why = _layouts(tensors, H)
    if not layouts:
        return None, why
    acts = _activations(region.nodes)
    if not acts:
        return None, f"no registered activation ({sorted(ACTIVATIONS)}) matches its ops"
    E = next(iter(layouts))[1]["w_gate"]
    E = apply_steps(tensors[E[0]], E[1]).shape[0]
    T = max(6, math.ceil(E / K) + 3)
    syms = _sym_values(region, T)
    if syms is None:
        return None, "cannot size a probe input (token count not a free symbol)"
    probe = _probe_module(gm, region)
    w_dtype = tensors[layouts[0][1]["w_gate"][0]].dtype
    tol = _TOL.get(w_dtype, _TOL_HALF)
    device = tensors[layouts[0][1]["w_gate"][0]].device
    gen = torch.Generator().manual_seed(0)
    # a second probe scaled so that gate pre-activations reach ~8 standard deviations: clamps and saturation engage
    gu = tensors[layouts[0][1]["w_gate"][0]]
    w_std = float(gu[0, :256].detach().float().std()) or 1.0
    big = 8.0 / (w_std * math.sqrt(H))
    probes = []
    with torch.no_grad():
        for scale in (1.0, big):
            inputs = _probe_inputs(region, E, T, scale, gen, device)
            try:
                ref = probe(*inputs, *syms)
            except Exception as exc:  # the cut-out region does not run on its own
                return None, f"its graph does not run on probe inputs ({type(exc).__name__}: {exc})"
            probes.append((inputs, ref))
    best, best_err, errors = None, math.inf, []
    with torch.no_grad():
        for label, views in layouts:
            for act, args in acts:
                cand = Candidate(label, {k: (region.attrs[s], st) for k, (s, st) in views.items()}, act, args)
                w = _view_tensors(views, tensors)
                err = 0.0
                for inputs, ref in probes:
                    try:
                        got = moe_reference_grouped(*inputs, **w, activation=act, activation_args=args)
                    except MoEError:
                        err = math.inf
                        break
                    err = max(err, rel_rms(got.float(), ref.float()))
                errors.append(err)
                if err < tol and err < best_err:
                    best, best_err = cand, err
    if best is None:
        return None, f"no canonical layout reproduces it (best probe error {min(errors):.1e}, tolerance {tol:.0e})"
    return best, f"{best.label}, {best.activation}{best.activation_args or ''} (probe error {best_err:.1e})"


# -- rewriting -------------------------------------------------------------------------------------------------
def _register_view(gm: fx.GraphModule, index: int, name: str, source: str, steps: list, before: fx.Node,
                   like: Optional[fx.Node]) -> fx.Node:
    tensor = apply_steps(getattr_path(gm, source).detach(), steps)
    attr = f"{ATTR_PREFIX}_{index}_{name}"
    while hasattr(gm, attr):
        attr += "_"
    gm.register_buffer(attr, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta[DERIVED_META] = ("moe_view", [source], [list(s) for s in steps])
    mode = getattr(val(like), "fake_mode", None) if like is not None else None
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def _replace_region(gm: fx.GraphModule, region: Region, cand: Candidate, index: int) -> fx.Node:
    graph = gm.graph
    kwargs: dict[str, Any] = {}
    for name in WEIGHT_ARGS:
        if name in cand.views:
            src, steps = cand.views[name]
            kwargs[name] = _register_view(gm, index, name, src, steps, region.output, region.hidden)
    kwargs["activation"] = cand.activation
    if cand.activation_args is not None:
        kwargs["activation_args"] = list(cand.activation_args)
    with graph.inserting_before(region.output):
        new = graph.call_function(OP, (region.hidden, region.ids, region.weights), kwargs)
    new.meta = {k: v for k, v in region.output.meta.items() if k in ("val", "nn_module_stack", "stack_trace")}
    region.output.replace_all_uses_with(new)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    for node in region.inputs[3:]:  # size arithmetic only the region read
        if not node.users and node.op == "call_function":
            graph.erase_node(node)
    return new


_VIEW_OPS = {aten.view.default: "view", aten.reshape.default: "view", aten._unsafe_view.default: "view",
             aten.transpose.int: "transpose", aten.slice.Tensor: "slice", aten.t.default: "t"}


def _view_chain(node: Any) -> Optional[tuple[fx.Node, list]]:
    """(get_attr source, steps) if ``node`` is a chain of views of one get_attr; None otherwise."""
    steps: list = []
    while isinstance(node, fx.Node) and node.op == "call_function":
        kind = _VIEW_OPS.get(node.target)
        if kind is None:
            return None
        a = node.args
        if kind == "view":
            shape = [static_int(s) for s in a[1]]
            if None in shape:
                return None
            steps.append(("view", shape))
        elif kind == "transpose":
            steps.append(("transpose", int(a[1]), int(a[2])))
        elif kind == "t":
            steps.append(("transpose", 0, 1))
        else:
            dim, start = int(a[1]) if len(a) > 1 else 0, a[2] if len(a) > 2 else None
            stop, step = (a[3] if len(a) > 3 else None), (a[4] if len(a) > 4 else 1)
            if any(x is not None and static_int(x) is None for x in (start, stop, step)):
                return None
            steps.append(("slice", dim, start, stop if stop is None or stop < 2**62 else None, step))
        node = a[0]
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, list(reversed(steps))
    return None


def _normalize_existing(gm: fx.GraphModule, node: fx.Node, index: int) -> bool:
    """Weight arguments of a ``moe_experts`` node that are views of get_attrs become get_attrs of view tensors."""
    args = moe_inputs(node)
    kwargs = {k: v for k, v in args.items() if k not in ("hidden", "topk_ids", "topk_weights")}
    changed = False
    for name in WEIGHT_ARGS:
        a = args[name]
        if not isinstance(a, fx.Node) or a.op == "get_attr":
            continue
        chain = _view_chain(a)
        if chain is None:
            continue
        src, steps = chain
        kwargs[name] = _register_view(gm, index, name, src.target, steps, node, args["hidden"])
        changed = True
    if changed:
        node.args = (args["hidden"], args["topk_ids"], args["topk_weights"])
        node.kwargs = kwargs
    return changed


@register_pass("match_moe")
def match_moe(gm: fx.GraphModule, ctx) -> PassResult:
    result = PassResult()
    regions = experts_regions(gm)
    converted, refused, at_export = [], [], []
    index = 0
    for path, (cls, nodes) in regions.items():
        name = path[2:] if path.startswith("m.") else path
        existing = [n for n in nodes if is_op(n, torch.ops.autodeploy.moe_experts)]
        if existing:
            for n in existing:
                _normalize_existing(gm, n, index)
                index += 1
            at_export.append(name)
            continue
        region, why = _region(gm, path, cls, nodes)
        cand = None
        if region is not None:
            with probe_weights(gm, region.attrs.values()):  # deferred weights: seeded random stand-ins
                cand, why = _try_region(gm, region)
        if cand is None:
            refused.append(f"{name} ({cls}): {why}")
            continue
        _replace_region(gm, region, cand, index)
        index += 1
        converted.append((name, cls, why))
    if converted or at_export:
        gm.graph.lint()
        gm.recompile()
    result.num_matches = len(converted) + len(at_export)
    if converted:
        forms = sorted({f"{cls}: {why.split(' (probe')[0]}" for _, cls, why in converted})
        result.notes.append(f"{len(converted)} MoE experts layers converted to moe_experts ({'; '.join(forms)})")
    if at_export:
        result.notes.append(f"{len(at_export)} MoE experts layers emitted as moe_experts at export")
    for r in refused:
        result.notes.append(f"MoE experts not converted: {r}")
        log.info("match_moe: not converted: %s", r)
    return result
