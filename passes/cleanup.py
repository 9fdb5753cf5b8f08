"""Remove what export leaves behind and later passes should not have to see: runtime asserts and guard
calls, casts to the dtype a tensor already has, aliases, identity views and full-range slices, dead code."""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.utils import aten, is_op, remove_dead_code, same_shape, static_int, val
from autodeploy.graph.passes import PassResult, register_pass

_ASSERTS = (aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
            aten._assert_async)
_INT64_MAX = 2**63 - 1


def _is_noop(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    out, inp = val(node), val(src)
    if is_op(node, aten.alias, aten.detach, aten.lift_fresh_copy) and not is_op(node, aten.lift_fresh_copy):
        return True
    if out is None or inp is None:
        return False
    if is_op(node, aten.to, aten._to_copy, aten.type_as):
        return out.dtype == inp.dtype and out.device == inp.device and same_shape(out.shape, inp.shape)
    if is_op(node, aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.contiguous):
        return same_shape(out.shape, inp.shape)
    if is_op(node, aten.slice):
        start = node.args[2] if len(node.args) > 2 else 0
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        # a start given by a graph value (a symbol) is not known to be 0: only a literal 0 (or none) is a no-op
        return ((start is None or static_int(start) == 0) and (end is None or static_int(end) == _INT64_MAX)
                and static_int(step) == 1)
    return False


def _inline_grad_mode_wrappers(gm: fx.GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` / ``wrap_with_autocast`` subgraphs (export keeps HF's
    ``torch.no_grad()``/``autocast(enabled=False)`` regions as higher-order ops). In an inference graph they are
    no-ops, and plain nodes are easier to match, compile and serialize."""
    import operator

    hops = {getattr(torch.ops.higher_order, n, None) for n in ("wrap_with_set_grad_enabled", "wrap_with_autocast")}
    hops.discard(None)
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in hops:
            continue
        # wrap_with_set_grad_enabled(enabled, fn, *args); wrap_with_autocast(device, dtype, enabled, cache, fn, *args)
        n_flags = 1 if node.target is getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None) else 4
        sub_node, args = node.args[n_flags], node.args[n_flags + 1:]
        if not isinstance(sub_node, fx.Node) or sub_node.op != "get_attr":
            continue
        sub = getattr(gm, sub_node.target)
        env: dict[fx.Node, object] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, args))
        outputs = None
        with gm.graph.inserting_before(node):
            for sn in sub.graph.nodes:
                if sn.op == "placeholder":
                    continue
                if sn.op == "output":
                    outputs = fx.node.map_arg(sn.args[0], lambda n: env[n])
                    continue
                if sn.op == "get_attr":  # hoist the submodule's own attributes onto the root
                    name = f"{sub_node.target}_{sn.target.replace('.', '_')}"
                    setattr(gm, name, getattr(sub, sn.target))
                    env[sn] = gm.graph.get_attr(name)
                    continue
                env[sn] = gm.graph.node_copy(sn, lambda n: env[n])
        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
            count += 1
    return count


@register_pass("cleanup")
def cleanup(gm: fx.GraphModule, ctx) -> PassResult:
    removed = _inline_grad_mode_wrappers(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
            removed += 1
        elif is_op(node, *_ASSERTS):
            gm.graph.erase_node(node)
            removed += 1
        elif node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node) and _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    dead = remove_dead_code(gm)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    notes = [f"{dead} dead nodes removed"] if dead else []
    return PassResult(removed, notes)
