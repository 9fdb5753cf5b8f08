"""Tensor parallelism as a graph rewrite: shard the canonical graph of one rank out of ``world_size``.

Runs on the canonical graph (after attention/rope/norm matching, before ``insert_kv_cache``), so the attention
ops' head counts, and with them every ``AttentionSpec`` and KV cache, come out local to the rank.

* **Column-parallel** (output features split by rank): q/k/v of every attention layer, and the gate/up ops of
  every MLP (``down(act(gate(x)) * up(x))``, plain linears or grouped expert GEMMs). A weight that is consumed
  by ``chunk(k, -1)`` (a fused gate_up) is split per part, so each rank keeps matching gate and up rows.
* **Heads.** Query heads are divided; KV heads too, or replicated (each rank keeps the one KV head its query
  heads read) when there are fewer KV heads than ranks.
* **Row-parallel** (input features split): o and down; their output is a partial sum, all-reduced right after
  with torch's functional collectives (``_c10d_functional.all_reduce`` + ``wait_tensor``: traceable ops, so the
  graph still exports and captures in CUDA graphs). A row bias is added once, after the all-reduce.
* **MoE** ``autodeploy::moe_experts``: expert weights split along the intermediate dim (by argument name),
  ``b_down`` kept on rank 0 only, all-reduce after.
* **Vocab-parallel** embedding (each rank looks up its vocab rows, zeros elsewhere, all-reduce) and LM head
  (each rank projects its vocab rows, all-gather of the logits).

Deferred weights (a rank compiling from a checkpoint directory, ``models.shard_loading``) are cut as fake
tensors; the cuts stay in the plan (``ShardPlan.weights``, by get_attr target) and the loader reads exactly those
ranges from the checkpoint afterwards. Tensors the pass creates carry a recipe (``meta[DERIVED_META]``).

Everything is then *proven* by a forward walk: every node that reads a sharded value must be an op whose rule
says the local computation is the rank's block of the full one (``_RULES``, by op), and its re-propagated
shape must be the old one with exactly the sharded dim scaled. Anything else (a norm over a sharded dim, a
slice across it, an op without a rule) refuses the model with ``TensorParallelError`` naming the node.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional

import torch
from torch import fx

from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import DERIVED_META, aten, getattr_path, is_op, val

log = logging.getLogger(__name__)

_c10d = torch.ops._c10d_functional


class TensorParallelError(UnsupportedModelError):
    """The graph holds something the tensor-parallel pass cannot shard correctly (the node is named)."""


# -- plan -------------------------------------------------------------------------------------------------
@dataclass
class WeightShard:
    """How one parameter is cut: along ``dim``, the concatenation of ``ranges`` ((start, length) pairs)."""

    dim: int
    ranges: list[tuple[int, int]]

    def take(self, t: torch.Tensor) -> torch.Tensor:
        parts = [t.narrow(self.dim, s, n) for s, n in self.ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)).contiguous().clone()


@dataclass
class ShardPlan:
    """What the pass decided, for ``explain()`` and the tests: node name -> role, and bytes per rank."""

    rank: int
    world_size: int
    roles: dict[str, str] = field(default_factory=dict)  # op node -> column | row | vocab | replicated | moe
    weights: dict[str, WeightShard] = field(default_factory=dict)  # get_attr target -> its cut
    full_bytes: int = 0
    local_bytes: int = 0
    heads: list[str] = field(default_factory=list)  # per attention layer: "Hq/Hkv -> local"

    def notes(self) -> list[str]:
        counts: dict[str, int] = {}
        for role in self.roles.values():
            counts[role] = counts.get(role, 0) + 1
        out = [f"rank {self.rank} of {self.world_size}: " + ", ".join(f"{n} {r}" for r, n in sorted(counts.items())),
               f"weights per rank {self.local_bytes / 2**20:.2f} MiB of {self.full_bytes / 2**20:.2f} MiB "
               f"({100.0 * self.local_bytes / max(1, self.full_bytes):.0f}%)"]
        if self.heads:
            out.append("attention heads (q/kv): " + ", ".join(sorted(set(self.heads))))
        out += [f"{name}: {role}" for name, role in self.roles.items()]
        return out


def _even(size: int, world: int, rank: int, what: str) -> list[tuple[int, int]]:
    if size % world:
        raise TensorParallelError(f"{what}: size {size} is not divisible by tensor_parallel_size={world}")
    n = size // world
    return [(rank * n, n)]


def _parts(size: int, parts: int, world: int, rank: int, what: str) -> list[tuple[int, int]]:
    """The rank's block of each of ``parts`` equal parts (a fused gate_up keeps matching gate and up rows)."""
    if size % parts:
        raise TensorParallelError(f"{what}: size {size} does not split into {parts} parts")
    step = size // parts
    return [(p * step + s, n) for p in range(parts) for s, n in _even(step, world, rank, what)]


# -- graph reading ----------------------------------------------------------------------------------------
def _attr(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = getattr_path(gm, node.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _is_grouped_mm(node: Any) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and "grouped_mm" in str(node.target)
            and len(node.args) >= 2)


def _grouped_weight(node: fx.Node) -> Optional[fx.Node]:
    """The ``[E, N, K]`` parameter of ``grouped_mm(x, transpose(W, -2, -1), offs)`` (HF's expert GEMMs)."""
    w = node.args[1]
    if is_op(w, aten.transpose) and tuple(int(d) % 3 for d in w.args[1:3]) in ((1, 2), (2, 1)):
        w = w.args[0]
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _weight_node(node: Any) -> Optional[fx.Node]:
    """The weight get_attr of a shardable GEMM (``linear`` or a grouped expert GEMM), else None."""
    if is_op(node, aten.linear) and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        return node.args[1]
    if _is_grouped_mm(node):
        return _grouped_weight(node)
    return None


def _role_key(node: fx.Node) -> str:
    """The plan's name for an op: its weight's module path (``model.layers.0.self_attn.q_proj``)."""
    w = _weight_node(node) if node.op == "call_function" and not is_op(node, aten.embedding) else None
    w = w if w is not None else (node.args[0] if is_op(node, aten.embedding) else None)
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path.removeprefix('m.')} ({node.name})" if path else node.name
    target = w.target[2:] if w.target.startswith("m.") else w.target
    return target[:-7] if target.endswith(".weight") else target


def _label(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return f"{node.name} ({node.target}{', in ' + path if path else ''})"


_HEAD_PRESERVING = (aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.contiguous, aten.clone,
                    aten._to_copy, aten.to, aten.alias)


def _source_gemm(x: Any) -> Optional[fx.Node]:
    """Walk from an attention input back through layout ops, per-head norms and RoPE to its projection."""
    while isinstance(x, fx.Node):
        if _weight_node(x) is not None:
            return x
        if x.target is operator.getitem and is_op(x.args[0], torch.ops.autodeploy.rope):
            x = x.args[0].args[x.args[1]]
        elif is_op(x, *_HEAD_PRESERVING, torch.ops.autodeploy.rms_norm):
            x = x.args[0]
        else:
            return None
    return None


def _sink_gemm(node: fx.Node) -> Optional[fx.Node]:
    """Walk from an attention output forward through layout ops to the projection that reads it (o_proj)."""
    x = node
    while len(x.users) == 1:
        (user,) = x.users
        if _weight_node(user) is not None and user.args[0] is x:
            return user
        if not is_op(user, aten.transpose, aten.reshape, aten.view, aten._unsafe_view, aten.contiguous,
                     aten.clone):
            return None
        x = user
    return None


_ELEMENTWISE = (aten.silu, aten.gelu, aten.relu, aten.tanh, aten.sigmoid, aten.neg, aten.mul, aten.div,
                aten.add, aten.sub, aten.pow, aten._to_copy, aten.to, aten.clone, aten.contiguous, aten.alias,
                aten.exp, aten.erf, aten.square, aten.clamp, aten.minimum, aten.maximum)


def _chunk_parts(node: fx.Node) -> int:
    """k if every user of ``node`` is one ``chunk(node, k, -1)`` (a fused gate_up), else 1."""
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], aten.chunk):
        nd = val(node).dim() if val(node) is not None else 0
        dim = users[0].args[2] if len(users[0].args) > 2 else users[0].kwargs.get("dim", 0)
        if nd and int(dim) % nd == nd - 1:
            return int(users[0].args[1])
    return 1


def _mlp_leaves(x: Any, taken: set) -> Optional[list[fx.Node]]:
    """The GEMMs an MLP's down projection reads through elementwise ops (``act(gate(x)) * up(x)``), or None
    if anything else feeds it."""
    leaves, stack, seen = [], [x], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node):
            continue
        if n in seen:
            continue
        seen.add(n)
        if _weight_node(n) is not None and n not in taken:
            leaves.append(n)
        elif n.target is operator.getitem and is_op(n.args[0], aten.chunk):
            src = n.args[0].args[0]
            if _weight_node(src) is None or src in taken or _chunk_parts(src) == 1:
                return None
            leaves.append(src)
        elif is_op(n, *_ELEMENTWISE):
            tensors = [a for a in n.args if isinstance(a, fx.Node)]
            if not tensors:
                return None
            stack.extend(tensors)
        else:
            return None
    return list(dict.fromkeys(leaves)) or None


# -- planning ---------------------------------------------------------------------------------------------
@dataclass
class _Col:
    frac: Fraction
    ranges: list[tuple[int, int]]  # along the op's output features
    parts: int = 1


def _plan_attention(gm: fx.GraphModule, world: int, rank: int, plan: ShardPlan,
                    cols: dict[fx.Node, _Col], rows: set[fx.Node]) -> int:
    from autodeploy.ops.attention import attention_inputs
    from autodeploy.ops.variants import param_names

    count = 0
    for node in gm.graph.nodes:
        if not is_op(node, torch.ops.autodeploy.attention):
            continue
        count += 1
        a = attention_inputs(node)
        for name in param_names():
            if isinstance(a.get(name), fx.Node):
                raise TensorParallelError(f"attention {_label(node)}: the per-head tensor parameter {name!r} is "
                                          "not sharded by the tensor-parallel pass yet")
        hq, hkv, d, dv = (int(val(a["q"]).shape[1]), int(val(a["k"]).shape[1]), int(val(a["q"]).shape[3]),
                          int(val(a["v"]).shape[3]))
        if hq % world:
            raise TensorParallelError(f"attention {_label(node)}: {hq} query heads are not divisible by "
                                      f"tensor_parallel_size={world}")
        if hkv >= world and hkv % world:
            raise TensorParallelError(f"attention {_label(node)}: {hkv} KV heads are not divisible by "
                                      f"tensor_parallel_size={world}")
        if hkv < world and world % hkv:
            raise TensorParallelError(f"attention {_label(node)}: tensor_parallel_size={world} is not a multiple "
                                      f"of its {hkv} KV heads (needed to replicate them)")
        q_loc = hq // world
        if hkv >= world:
            kv_loc, kv_start = hkv // world, rank * (hkv // world)
        else:  # fewer KV heads than ranks: each rank keeps the KV head its query heads read
            kv_loc, kv_start = 1, rank // (world // hkv)
        plan.heads.append(f"{hq}/{hkv} -> {q_loc}/{kv_loc}")
        sources = {}
        for name in ("q", "k", "v"):
            src = _source_gemm(a[name])
            if src is None:
                raise TensorParallelError(
                    f"attention {_label(node)}: its {name} does not come from its own projection through layout "
                    "ops, per-head norms and RoPE (a fused or sliced projection is not sharded yet)")
            sources[name] = src
        if len(set(sources.values())) != 3:
            raise TensorParallelError(f"attention {_label(node)}: q/k/v share a projection; not sharded yet")
        specs = {"q": (Fraction(1, world), [(rank * q_loc * d, q_loc * d)]),
                 "k": (Fraction(kv_loc, hkv), [(kv_start * d, kv_loc * d)]),
                 "v": (Fraction(kv_loc, hkv), [(kv_start * dv, kv_loc * dv)])}
        for name, src in sources.items():
            frac, ranges = specs[name]
            if src in cols and (cols[src].frac, cols[src].ranges) != (frac, ranges):
                raise TensorParallelError(f"{_label(src)} feeds two attention layers with different head cuts")
            cols[src] = _Col(frac, ranges)
            plan.roles[_role_key(src)] = "column" if frac != 1 else "replicated (one KV head)"
        out = _sink_gemm(node)
        if out is None:
            raise TensorParallelError(f"attention {_label(node)}: its output does not go straight (through layout "
                                      "ops) into an output projection, which would take the row-parallel cut")
        rows.add(out)
        plan.roles[_role_key(out)] = "row"
    return count


def _plan_mlps(gm: fx.GraphModule, world: int, rank: int, plan: ShardPlan,
               cols: dict[fx.Node, _Col], rows: set[fx.Node]) -> int:
    count = 0
    for node in list(gm.graph.nodes):
        if _weight_node(node) is None or node in cols or node in rows:
            continue
        leaves = _mlp_leaves(node.args[0], set(cols) | rows | {node})
        if leaves is None:
            continue
        for leaf in leaves:
            size = int(val(leaf).shape[-1])
            parts = _chunk_parts(leaf)
            cols[leaf] = _Col(Fraction(1, world), _parts(size, parts, world, rank, _label(leaf)), parts)
            plan.roles[_role_key(leaf)] = "column" if parts == 1 else f"column ({parts} fused parts)"
        rows.add(node)
        plan.roles[_role_key(node)] = "row"
        count += 1
    return count


# -- collectives ------------------------------------------------------------------------------------------
def _all_reduce(graph: fx.Graph, x: fx.Node, group: str) -> fx.Node:
    red = graph.call_function(_c10d.all_reduce.default, (x, "sum", group))
    return graph.call_function(_c10d.wait_tensor.default, (red,))


def _insert_after(graph: fx.Graph, node: fx.Node, build: Callable[[fx.Node], fx.Node]) -> fx.Node:
    users = list(node.users)
    with graph.inserting_before(node.next):  # keeps the built nodes in creation order
        out = build(node)
    for u in users:
        u.replace_input_with(node, out)
    return out


# -- the forward walk: every reader of a sharded value needs a rule ---------------------------------------
@dataclass(frozen=True)
class _S:
    """A sharded value: the rank's block along ``dim`` (``frac`` of it), made of ``parts`` fused parts."""

    dim: int
    frac: Fraction
    parts: int = 1


Rule = Callable[[fx.Node, dict], Any]
_RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return deco


def _refuse(node: fx.Node, why: str) -> None:
    raise TensorParallelError(f"tensor parallelism cannot shard {_label(node)}: {why}")


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


@_rule(*_ELEMENTWISE, aten.where, aten.masked_fill)
def _elementwise(node: fx.Node, st: dict) -> _S:
    out = val(node)
    found = None
    for a in _tensor_args(node):
        s, v = st.get(a), val(a)
        if isinstance(s, _S):
            d = s.dim - v.dim() + out.dim()  # broadcast aligns trailing dims
            old_in = a.meta.get("tp_old_val", v)  # ``out`` still holds the unsharded shape here
            if d < 0 or str(out.shape[d]) != str(old_in.shape[s.dim]):
                _refuse(node, f"{a.name} is broadcast along its sharded dim")
            if found is not None and (found.dim, found.frac) != (d, s.frac):
                _refuse(node, "its inputs are sharded differently")
            found = _S(d, s.frac, s.parts if found is None else min(s.parts, found.parts))
    for a in _tensor_args(node):
        v = val(a)
        if st.get(a) is None and v is not None and v.dim() > 0:
            d = found.dim - out.dim() + v.dim()
            if 0 <= d < v.dim() and str(v.shape[d]) != "1":
                _refuse(node, f"it mixes a sharded value with the full (replicated) {a.name} along dim {d}")
    return found


def _prefix(shape: Any, n: int) -> Any:
    return math.prod([s for s in shape[:n]]) if n else 1


@_rule(aten.view, aten.reshape, aten._unsafe_view)
def _reshape(node: fx.Node, st: dict) -> _S:
    s: _S = st[node.args[0]]
    old_in, old_out = node.args[0].meta["tp_old_val"].shape, node.meta["tp_old_val"].shape
    if s.parts != 1:
        _refuse(node, "a reshape of a fused (multi-part) sharded value")
    target = _prefix(old_in, s.dim)
    for j in range(len(old_out) + 1):
        p = _prefix(old_out, j)
        if str(p) == str(target) or (isinstance(p, int) and isinstance(target, int) and p == target):
            break
    else:
        _refuse(node, "the sharded dim does not map onto one output dim")
    if j >= len(old_out):
        _refuse(node, "the sharded dim does not map onto one output dim")
    shape = list(node.args[1])
    if isinstance(shape[j], int) and shape[j] != -1:
        new = Fraction(shape[j]) * s.frac
        if new.denominator != 1:
            _refuse(node, f"dim {j} of size {shape[j]} does not shard by {s.frac}")
        shape[j] = int(new)
        node.args = (node.args[0], shape, *node.args[2:])
    return _S(j, s.frac)


@_rule(aten.transpose)
def _transpose(node: fx.Node, st: dict) -> _S:
    s = st[node.args[0]]
    nd = val(node.args[0]).dim()
    a, b = int(node.args[1]) % nd, int(node.args[2]) % nd
    return _S(b if s.dim == a else a if s.dim == b else s.dim, s.frac, s.parts)


@_rule(aten.permute)
def _permute(node: fx.Node, st: dict) -> _S:
    s = st[node.args[0]]
    nd = val(node.args[0]).dim()
    dims = [int(d) % nd for d in node.args[1]]
    return _S(dims.index(s.dim), s.frac, s.parts)


@_rule(aten.unsqueeze)
def _unsqueeze(node: fx.Node, st: dict) -> _S:
    s = st[node.args[0]]
    d = int(node.args[1]) % val(node).dim()
    return _S(s.dim + (1 if d <= s.dim else 0), s.frac, s.parts)


@_rule(aten.slice, aten.select, aten.index_select)
def _slice(node: fx.Node, st: dict) -> _S:
    s = st[node.args[0]]
    if any(st.get(a) is not None for a in _tensor_args(node)[1:]):
        _refuse(node, "an index that is itself sharded")
    nd = val(node.args[0]).dim()
    d = int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
    if d == s.dim:
        _refuse(node, "it slices across the sharded dim")
    if is_op(node, aten.select):
        return _S(s.dim - (1 if d < s.dim else 0), s.frac, s.parts)
    return s


@_rule(aten.chunk, aten.split, aten.split_with_sizes)
def _chunk(node: fx.Node, st: dict) -> tuple:
    s = st[node.args[0]]
    nd = val(node.args[0]).dim()
    d = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
    n = len(node.meta["tp_old_val"])
    if d != s.dim:
        return tuple([s] * n)
    if not is_op(node, aten.chunk) or s.parts != int(node.args[1]) or n != s.parts:
        _refuse(node, "it splits across the sharded dim (only a chunk into the weight's fused parts is sharded)")
    return tuple([_S(s.dim, s.frac)] * n)


@_rule(operator.getitem)
def _getitem(node: fx.Node, st: dict) -> Any:
    s = st[node.args[0]]
    return s[node.args[1]] if isinstance(s, tuple) else s


@_rule(torch.ops.autodeploy.rope)
def _rope(node: fx.Node, st: dict) -> tuple:
    q, k, cos, sin = node.args[:4]
    if st.get(cos) is not None or st.get(sin) is not None:
        _refuse(node, "sharded cos/sin")
    for x in (q, k):
        if st.get(x) is not None and st[x].dim != 1:
            _refuse(node, f"{x.name} is not sharded along heads")
    return st.get(q), st.get(k)


@_rule(torch.ops.autodeploy.rms_norm)
def _rms_norm(node: fx.Node, st: dict) -> _S:
    s = st.get(node.args[0])
    if s is None or any(st.get(a) is not None for a in _tensor_args(node)[1:]):
        _refuse(node, "a sharded norm weight")
    if s.dim == val(node.args[0]).dim() - 1:
        _refuse(node, "it normalizes over the sharded dim (a norm over all heads at once)")
    return s


@_rule(torch.ops.autodeploy.attention)
def _attention(node: fx.Node, st: dict) -> _S:
    from autodeploy.ops.attention import attention_inputs

    a = attention_inputs(node)
    q, k, v = (st.get(a[n]) for n in ("q", "k", "v"))
    if q is None or q.dim != 1:
        _refuse(node, "its queries are not sharded along heads")
    for name, s in (("k", k), ("v", v)):
        if s is not None and s.dim != 1:
            _refuse(node, f"its {name} is not sharded along heads")
        if s is None and int(val(a[name]).shape[1]) != 1:
            _refuse(node, f"its {name} keeps all KV heads while the queries are sharded")
    return _S(1, q.frac)


def _fake_mode(gm: fx.GraphModule) -> Any:
    for node in gm.graph.nodes:
        v = val(node)
        if v is not None and getattr(v, "fake_mode", None) is not None:
            return v.fake_mode
    return None


def _repropagate(node: fx.Node, mode: Any) -> None:
    """Recompute ``node.meta['val']`` from its inputs' (local) fake values. An input without one (the
    ``logits_index`` gather's placeholder) leaves the node without one too: only the proven walk needs them."""
    missing = []
    args, kwargs = fx.node.map_arg((node.args, node.kwargs),
                                   lambda n: n.meta["val"] if n.meta.get("val") is not None else missing.append(n))
    if missing:
        node.meta.pop("val", None)
        return
    with mode:
        if is_op(node, aten.linear):  # the C++ composite calls numel() on symbolic shapes (torch 2.11)
            x, w = args[0], args[1]
            node.meta["val"] = x.new_empty((*x.shape[:-1], w.shape[0]))
        else:
            node.meta["val"] = node.target(*args, **kwargs)


def _check_shape(node: fx.Node, s: Any) -> None:
    old, new = node.meta["tp_old_val"], node.meta.get("val")
    if isinstance(s, tuple):
        for i, (o, n, si) in enumerate(zip(old, new, s)):
            _check_one(node, o, n, si, f"output {i}")
    elif isinstance(s, _S):
        _check_one(node, old, new, s, "output")


def _check_one(node: fx.Node, old: Any, new: Any, s: Optional[_S], what: str) -> None:
    if not isinstance(old, torch.Tensor):
        return
    want = list(old.shape)
    if s is not None:
        size = want[s.dim]
        scaled = Fraction(int(size)) * s.frac if isinstance(size, int) else None
        if scaled is None or scaled.denominator != 1:
            _refuse(node, f"{what} dim {s.dim} ({size}) does not shard by {s.frac}")
        want[s.dim] = int(scaled)
    if [str(x) for x in want] != [str(x) for x in new.shape]:
        _refuse(node, f"{what} has shape {tuple(new.shape)} on this rank, expected {tuple(want)}")


def _walk(gm: fx.GraphModule, cols: dict, rows: set, inserted: set, changed: set, mode: Any) -> None:
    """Propagate shard states in graph order, re-derive shapes, and refuse any unproven reader."""
    st: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        inputs = _tensor_args(node)
        sharded_in = [a for a in inputs if st.get(a) is not None]
        if node in cols:
            if sharded_in:
                _refuse(node, "a column-parallel GEMM reads a sharded input")
            _repropagate(node, mode)
            c = cols[node]
            s = None if c.frac == 1 else _S(val(node).dim() - 1, c.frac, c.parts)
            _check_shape(node, s)
            st[node] = s
        elif node in rows:
            s = st.get(node.args[0])
            if s is None or s.dim != val(node.args[0]).dim() - 1 or s.parts != 1 or s.frac != _row_frac(cols):
                _refuse(node, "a row-parallel GEMM whose input is not its rank's block of features")
            _repropagate(node, mode)
            _check_shape(node, None)
        elif node in inserted or (not sharded_in and any(a in changed for a in inputs)):
            if sharded_in:  # the vocab-parallel ops, MoE and the collectives read replicated values only
                _refuse(node, f"it reads the sharded value {sharded_in[0].name}")
            _repropagate(node, mode)
        elif sharded_in:
            packet = getattr(node.target, "overloadpacket", node.target)
            rule = _RULES.get(packet)
            if rule is None:
                _refuse(node, "it reads a sharded value and has no tensor-parallel rule")
            s = rule(node, st)
            try:
                _repropagate(node, mode)
            except Exception as exc:  # the local shapes do not compute: never guess
                _refuse(node, f"its local shapes do not compute ({type(exc).__name__}: {exc})")
            _check_shape(node, s)
            st[node] = s
        else:
            continue
        changed.add(node)


def _row_frac(cols: dict) -> Fraction:
    """The fraction every row-parallel input must hold: the rank's even block (1 / world)."""
    return min((c.frac for c in cols.values()), default=Fraction(1))


def _remember_old(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if v is not None:
            node.meta["tp_old_val"] = v


# -- the pass ---------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _set_attr(gm: fx.GraphModule, target: str, tensor: torch.Tensor) -> None:
    *path, name = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    old = getattr(mod, name)
    if isinstance(old, torch.nn.Parameter):
        delattr(mod, name)
        mod.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        delattr(mod, name)
        mod.register_buffer(name, tensor)


class _Cuts:
    """Every parameter cut, checked for agreement: one tensor read by two ops must be cut the same way."""

    def __init__(self, gm: fx.GraphModule, plan: ShardPlan):
        self.gm, self.plan = gm, plan

    def add(self, node: fx.Node, w: fx.Node, cut: WeightShard) -> None:
        old = self.plan.weights.get(w.target)
        if old is not None and (old.dim, old.ranges) != (cut.dim, cut.ranges):
            raise TensorParallelError(f"{w.target} is read by {_label(node)} and another op that need different "
                                      "tensor-parallel cuts")
        self.plan.weights[w.target] = cut


def _vocab_embedding(gm: fx.GraphModule, node: fx.Node, world: int, rank: int, group: str,
                     cuts: _Cuts, inserted: set) -> None:
    """``embedding(W, ids)`` -> the rank's vocab rows, zeros for other ids, then an all-reduce."""
    w, ids = node.args[0], node.args[1]
    vocab = int(val(w).shape[0])
    (start, n), = _even(vocab, world, rank, f"vocab of {_label(node)}")
    cuts.add(node, w, WeightShard(0, [(start, n)]))
    g = gm.graph
    with g.inserting_before(node):
        lo = g.call_function(aten.ge.Scalar, (ids, start))
        hi = g.call_function(aten.lt.Scalar, (ids, start + n))
        inside = g.call_function(aten.logical_and.default, (lo, hi))
        local = g.call_function(aten.sub.Scalar, (ids, start))
        zero = g.call_function(aten.zeros_like.default, (ids,))
        safe = g.call_function(aten.where.self, (inside, local, zero))
        inserted.update({lo, hi, inside, local, zero, safe})
    node.args = (w, safe, *node.args[2:])
    inserted.add(node)

    def build(x: fx.Node) -> fx.Node:
        mask = g.call_function(aten.unsqueeze.default, (inside, -1))
        zeros = g.call_function(aten.zeros_like.default, (x,))
        kept = g.call_function(aten.where.self, (mask, x, zeros))
        out = _all_reduce(g, kept, group)
        inserted.update({mask, zeros, kept, out, out.args[0]})
        return out

    _insert_after(g, node, build)


def _vocab_head(gm: fx.GraphModule, node: fx.Node, world: int, rank: int, group: str,
                cuts: _Cuts, inserted: set) -> None:
    """LM head ``linear(h, W)`` -> the rank's vocab rows, then an all-gather of the logits along vocab."""
    w = node.args[1]
    vocab = int(val(w).shape[0])
    cuts.add(node, w, WeightShard(0, _even(vocab, world, rank, f"vocab of {_label(node)}")))
    if len(node.args) > 2 and node.args[2] is not None:
        cuts.add(node, node.args[2], WeightShard(0, _even(vocab, world, rank, f"vocab of {_label(node)}")))
    nd = val(node).dim()
    g = gm.graph
    inserted.add(node)

    def build(x: fx.Node) -> fx.Node:
        first = g.call_function(aten.permute.default, (x, [nd - 1, *range(nd - 1)]))
        dense = g.call_function(aten.clone.default, (first,), {"memory_format": torch.contiguous_format})
        gathered = g.call_function(_c10d.all_gather_into_tensor.default, (dense, world, group))
        done = g.call_function(_c10d.wait_tensor.default, (gathered,))
        back = g.call_function(aten.permute.default, (done, [*range(1, nd), 0]))
        inserted.update({first, dense, gathered, done, back})
        return back

    _insert_after(g, node, build)


def _lm_head(gm: fx.GraphModule) -> Optional[fx.Node]:
    from autodeploy.passes.gather_logits import _lm_head as find

    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    head = find(logits)
    return head if head is not None and is_op(head, aten.linear) and _weight_node(head) is not None else None


def _moe_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    op = getattr(torch.ops.autodeploy, "moe_experts", None) if hasattr(torch.ops, "autodeploy") else None
    if op is None:
        return []
    return [n for n in gm.graph.nodes if is_op(n, op)]


def _shard_moe(gm: fx.GraphModule, node: fx.Node, world: int, rank: int, group: str, cuts: _Cuts,
               inserted: set, plan: ShardPlan) -> None:
    """``moe_experts`` by argument name: gate/up (and their biases) split along I, down along its I, b_down kept
    on rank 0 only, an all-reduce after."""
    schema = node.target._schema
    names = [a.name for a in schema.arguments]
    bound = dict(zip(names, node.args), **node.kwargs)
    known = {"w_gate": 1, "w_up": 1, "w_down": 2, "b_gate": 1, "b_up": 1}
    for name in ("w_gate", "w_up", "w_down"):
        w = bound.get(name)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            raise TensorParallelError(f"{_label(node)}: {name} is not a model parameter; cannot shard it")
    inter = int(val(bound["w_gate"]).shape[1])
    ranges = _even(inter, world, rank, f"experts intermediate size of {_label(node)}")
    for name, dim in known.items():
        w = bound.get(name)
        if isinstance(w, fx.Node):
            if w.op != "get_attr":
                raise TensorParallelError(f"{_label(node)}: {name} is not a model parameter; cannot shard it")
            cuts.add(node, w, WeightShard(dim, ranges))
    b_down = bound.get("b_down")
    if isinstance(b_down, fx.Node) and rank != 0:
        t = _attr(gm, b_down)
        name = f"tp_zero_{b_down.target.replace('.', '_')}"
        gm.register_buffer(name, torch.zeros_like(t))
        with gm.graph.inserting_before(node):
            zero = gm.graph.get_attr(name)
        zero.meta["val"] = val(b_down)
        zero.meta[DERIVED_META] = ("zeros", [], list(t.shape), str(t.dtype).replace("torch.", ""))
        node.replace_input_with(b_down, zero)
    for other, v in bound.items():
        if other not in known and other != "b_down" and isinstance(v, fx.Node) and v.op == "get_attr":
            t = _attr(gm, v)
            if t is not None and t.dim() >= 2 and t.shape[0] == val(bound["w_gate"]).shape[0]:
                raise TensorParallelError(f"{_label(node)}: per-expert tensor {other!r} has no tensor-parallel cut")
    inserted.add(node)

    def build(x: fx.Node) -> fx.Node:
        out = _all_reduce(gm.graph, x, group)
        inserted.update({out, out.args[0]})
        return out

    _insert_after(gm.graph, node, build)
    plan.roles[_role_key(node)] = "moe (experts split along the intermediate dim)"


def _check_readers(attrs: list[fx.Node], planned: set) -> None:
    """A cut parameter may only be read by the ops planned for it (directly or through one transpose)."""
    for a in attrs:
        for user in a.users:
            ok = user in planned or (is_op(user, aten.transpose) and user.users and set(user.users) <= planned)
            if not ok:
                raise TensorParallelError(f"parameter {a.target} is cut for tensor parallelism but also read by "
                                          f"{_label(user)}, which has no cut for it")


@register_pass("shard_tensor_parallel")
def shard_tensor_parallel(gm: fx.GraphModule, ctx, world_size: int = 1, rank: int = 0,
                          group_name: str = "") -> PassResult:
    """Shard the canonical graph for ``rank`` of ``world_size`` (``group_name``: the process group's name, as
    the functional collectives take it)."""
    if world_size <= 1:
        return PassResult(0, ["tensor_parallel_size=1: nothing to shard"])
    if not 0 <= rank < world_size:
        raise TensorParallelError(f"rank {rank} is outside tensor_parallel_size={world_size}")
    mode = _fake_mode(gm)
    if mode is None:
        raise TensorParallelError("the graph carries no fake values (was it exported with torch.export?)")
    plan = ShardPlan(rank, world_size)
    seen: set[str] = set()
    for node in gm.graph.nodes:
        t = _attr(gm, node)
        if t is not None and node.target not in seen:
            seen.add(node.target)
            plan.full_bytes += _nbytes(t)
    _remember_old(gm)
    cols: dict[fx.Node, _Col] = {}
    rows: set[fx.Node] = set()
    inserted: set[fx.Node] = set()
    cuts = _Cuts(gm, plan)
    num_attn = _plan_attention(gm, world_size, rank, plan, cols, rows)
    if num_attn == 0:
        raise TensorParallelError("no canonical attention layer found: tensor parallelism shards attention heads")
    _plan_mlps(gm, world_size, rank, plan, cols, rows)
    for node in _moe_nodes(gm):
        _shard_moe(gm, node, world_size, rank, group_name, cuts, inserted, plan)

    for node, c in cols.items():
        w = _weight_node(node)
        grouped = _is_grouped_mm(node)
        cuts.add(node, w, WeightShard(1 if grouped else 0, c.ranges))
        b = None if grouped else (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        if isinstance(b, fx.Node):
            cuts.add(node, b, WeightShard(0, c.ranges))
    g = gm.graph
    for node in [n for n in g.nodes if n in rows]:  # graph order: the same on every rank
        w = _weight_node(node)
        grouped = _is_grouped_mm(node)
        size = int(val(node.args[0]).shape[-1])
        cuts.add(node, w, WeightShard(2 if grouped else 1, _even(size, world_size, rank, _label(node))))
        bias = None if grouped else (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        if isinstance(bias, fx.Node):
            node.args, node.kwargs = node.args[:2], {}

        def build(x: fx.Node, bias=bias) -> fx.Node:
            out = _all_reduce(g, x, group_name)
            inserted.update({out, out.args[0]})
            if isinstance(bias, fx.Node):
                out = g.call_function(aten.add.Tensor, (out, bias))
                inserted.add(out)
            return out

        _insert_after(g, node, build)

    head = _lm_head(gm)
    head_w = head.args[1] if head is not None else None
    vocab = int(val(head_w).shape[0]) if head_w is not None else None
    if head is not None and vocab % world_size == 0:
        _vocab_head(gm, head, world_size, rank, group_name, cuts, inserted)
        plan.roles[_role_key(head)] = "vocab (all-gather of the logits)"
    elif head is not None:
        plan.roles[_role_key(head)] = f"replicated (vocab {vocab} not divisible by {world_size})"
    for node in list(g.nodes):  # the token embedding: the one that reads input_ids
        ids = node.args[1] if is_op(node, aten.embedding) else None
        if isinstance(ids, fx.Node) and ids.op == "placeholder" and ids.target == "input_ids":
            w = node.args[0]
            rows_ = int(val(w).shape[0])
            if _attr(gm, w) is not None and rows_ % world_size == 0:
                _vocab_embedding(gm, node, world_size, rank, group_name, cuts, inserted)
                plan.roles[_role_key(node)] = "vocab (all-reduce)"
            else:
                plan.roles[_role_key(node)] = f"replicated (vocab {rows_} not divisible by {world_size})"

    for node in g.nodes:
        if _weight_node(node) is not None and _role_key(node) not in plan.roles:
            plan.roles[_role_key(node)] = "replicated"

    # Cut the parameters, then prove the rewrite.
    by_target: dict[str, list[fx.Node]] = {}
    for node in g.nodes:
        if node.op == "get_attr":
            by_target.setdefault(node.target, []).append(node)
    planned = set(cols) | rows | inserted
    changed: set[fx.Node] = set()
    for target, cut in plan.weights.items():
        _check_readers(by_target.get(target, []), planned)
        local = cut.take(getattr_path(gm, target))
        _set_attr(gm, target, local)
        for n in by_target.get(target, []):
            n.meta["val"] = mode.from_tensor(local, static_shapes=True)
            changed.add(n)
    _walk(gm, cols, rows, inserted, changed, mode)
    for node in g.nodes:
        for key in ("tp_old_val", "tp_old_in"):
            node.meta.pop(key, None)

    seen.clear()
    for node in g.nodes:
        t = _attr(gm, node)
        if t is not None and node.target not in seen:
            seen.add(node.target)
            plan.local_bytes += _nbytes(t)
    gm.meta["tensor_parallel_plan"] = plan
    log.info("tensor parallel rank %d/%d: %s", rank, world_size, plan.notes()[1])
    return PassResult(len(plan.weights), plan.notes())
