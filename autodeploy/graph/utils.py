"""Small helpers for reading and editing ATen-level FX graphs. Passes share these instead of re-deriving them."""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
from torch import fx

# get_attr node meta key of a derived tensor's recipe (written by passes, read by the compile cache)
DERIVED_META = "derived_from"

aten = torch.ops.aten


def is_op(node: Any, *targets: Any) -> bool:
    """True if ``node`` calls one of ``targets`` (an OpOverload, an OpOverloadPacket or a Python callable)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    for target in targets:
        if node.target is target:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None and packet is target:
            return True
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor torch.export recorded for a node, if any."""
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
    return None


def same_shape(a: Any, b: Any) -> bool:
    """Shape equality that never guards on symbols: compares each dim's printed expression."""
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def static_int(x: Any) -> Optional[int]:
    """An int if ``x`` is a concrete integer (not a symbol)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x)
        except Exception:  # symbolic
            return None
    return None


def scalar_constant(gm: fx.GraphModule, x: Any) -> Optional[float]:
    """The value of a scalar operand: a Python number, a 0-d constant tensor, or a ``full([], c)`` node."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    if x.op == "get_attr":
        t = getattr_path(gm, x.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.item())
        return None
    if is_op(x, aten.full, aten.scalar_tensor):
        c = x.args[1] if is_op(x, aten.full) else x.args[0]
        return scalar_constant(gm, c)
    if is_op(x, aten.lift_fresh_copy, aten.clone, aten._to_copy, aten.to, aten.detach):
        return scalar_constant(gm, x.args[0])
    return None


def getattr_path(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def storage_id(t: torch.Tensor) -> int:
    """Which storage ``t`` views: the storage object itself, so fake and meta tensors (a sharded load's weights
    before they are read) compare too, where their data pointers cannot be read or are all zero."""
    return t.untyped_storage()._cdata


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the storages behind a module's parameters and buffers (views of one fused tensor count once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if storage_id(t) not in seen:
            seen.add(storage_id(t))
            total += t.untyped_storage().nbytes()
    return total


def ancestors(nodes: Iterable[fx.Node], stop: Optional[fx.Node] = None) -> set[fx.Node]:
    """``nodes`` and everything they read, transitively; the walk does not go past ``stop`` (kept itself)."""
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not stop:
            stack.extend(n.all_input_nodes)
    return seen


def subgraph_module(gm: fx.GraphModule, output: fx.Node | tuple[fx.Node, ...]) -> fx.GraphModule:
    """A runnable GraphModule that computes ``output`` (a node, or a tuple of nodes) from the graph inputs it
    depends on (its placeholders, in graph order)."""
    outs = output if isinstance(output, tuple) else (output,)
    needed = ancestors(outs)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[o] for o in outs) if isinstance(output, tuple) else env[output])
    return fx.GraphModule(gm, graph)


def placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}


def last_placeholder(gm: fx.GraphModule) -> fx.Node:
    return [n for n in gm.graph.nodes if n.op == "placeholder"][-1]


def add_placeholder(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a graph input after the existing ones."""
    with gm.graph.inserting_after(last_placeholder(gm)):
        return gm.graph.placeholder(name)


def getitem(graph: fx.Graph, node: fx.Node, index: int) -> fx.Node:
    return graph.call_function(operator.getitem, (node, index))


def _has_side_effects(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable or any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return node.op == "call_module"


def remove_dead_code(gm: fx.GraphModule) -> int:
    """DCE that treats seeded-random ATen ops (sdpa, dropout) as pure: in an inference graph they are.

    FX's own ``eliminate_dead_code`` keeps them because of their ``nondeterministic_seeded`` tag, which would
    keep every replaced attention's mask subgraph alive."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("call_function", "call_method", "get_attr") or node.users:
            continue
        if node.op != "get_attr" and _has_side_effects(node):
            continue
        gm.graph.erase_node(node)
        removed += 1
    return removed


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def flatten_heads(graph: fx.Graph, x: fx.Node, heads: int, dim: int) -> fx.Node:
    """``[1, H, T, D]`` -> ``[T, H, D]`` (the cached ops' flattened token layout)."""
    t = graph.call_function(aten.transpose.int, (x, 1, 2))
    return graph.call_function(aten.reshape.default, (t, [-1, heads, dim]))


def unflatten_source(x: Any) -> Optional[fx.Node]:
    """Inverse of :func:`flatten_heads` on the graph: the ``[1, H, T, D]`` node a flattened input came from."""
    if is_op(x, aten.reshape) and is_op(x.args[0], aten.transpose) and tuple(x.args[0].args[1:3]) == (1, 2):
        return x.args[0].args[0]
    return None


def _tiles(sources: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The tensor the sources already tile (consecutive, contiguous views of one storage covering all of it),
    e.g. after an earlier compile of the same model: reusing it avoids a second copy. Deferred (fake) weights
    have no storage to share: never."""
    from autodeploy.graph.probe_weights import is_deferred

    if any(is_deferred(s) for s in sources):
        return None
    first = sources[0]
    storage, offset = first.untyped_storage(), first.storage_offset()
    if offset != 0:
        return None
    for s in sources:
        if (not s.is_contiguous() or s.untyped_storage().data_ptr() != storage.data_ptr()
                or s.storage_offset() != offset or s.dtype != first.dtype):
            return None
        offset += s.numel()
    if offset * first.element_size() != storage.nbytes():
        return None
    shape = (sum(s.shape[0] for s in sources), *first.shape[1:])
    return first.new_empty(0).set_(storage, 0, shape)


@torch.no_grad()
def concat_shared(sources: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """``cat(sources, dim)``, then every source's storage is re-pointed at its slice of the result: the model's
    own parameters become views of the fused tensor, so the originals are freed and weights are not doubled."""
    if dim != 0:
        raise ValueError(f"only dim 0 concatenation keeps the source views contiguous, got dim={dim}")
    fused = _tiles(sources)
    if fused is not None:
        return fused
    fused = torch.cat([s.detach() for s in sources], dim)
    start = 0
    for s in sources:
        s.data = fused[start:start + s.shape[0]]
        start += s.shape[0]
    return fused
