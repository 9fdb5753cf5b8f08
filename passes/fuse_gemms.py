"""Merge linear layers that read the same input (q/k/v, gate/up) into one GEMM on a concatenated weight and
split its output: at batch-1 decode every GEMM launch costs time and small GEMMs leave most of the GPU idle.
The source parameters are re-pointed at row views of the fused weight, so weight memory is not doubled and the
HF model keeps working; the compile cache stores the fused weight as a recipe over the model's tensors."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, NamedTuple, Optional

import torch
from torch import fx

from autodeploy.graph.utils import DERIVED_META, arg, aten, concat_shared, getattr_path, getitem, is_op, val
from autodeploy.graph.passes import PassResult, register_pass

log = logging.getLogger(__name__)

FUSED_PREFIX = "fused_gemm"


class _Linear(NamedTuple):
    node: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]


def _attr_tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = getattr_path(gm, node.target)
    return t if isinstance(t, torch.Tensor) else None


def _fusible(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[tuple, _Linear]]:
    """``linear(x, W[, b])`` with get_attr weights and a known input: (grouping key, the linear) or None.

    The key holds everything the members of one fused GEMM must share. Presence of a bias is part of it: a
    mixed group is split into a biased and an unbiased GEMM rather than padded with a made-up zero bias, so
    every fused tensor stays a pure concatenation of model tensors (which the compile cache can rebuild)."""
    if not is_op(node, aten.linear) or len(node.args) < 2:
        return None
    x, w_node, b_node = node.args[0], node.args[1], arg(node, 2, "bias")
    w = _attr_tensor(gm, w_node)
    if (not isinstance(x, fx.Node) or val(x) is None or val(node) is None or w is None or w.dim() != 2
            or not w.is_floating_point()):
        return None
    if b_node is not None:
        b = _attr_tensor(gm, b_node)
        if b is None or b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != w.dtype or b.device != w.device:
            return None
    key = (x, w.dtype, w.device, w.shape[1], b_node is not None)
    return key, _Linear(node, w_node, b_node)


def find_groups(gm: fx.GraphModule) -> list[list[_Linear]]:
    """Groups of two or more fusible linears with one key, in graph order. A weight/bias tensor joins at most
    one group (a tensor re-pointed into two fused weights would keep only the last one's memory)."""
    by_key: dict[tuple, list[_Linear]] = {}
    for node in gm.graph.nodes:
        found = _fusible(gm, node)
        if found is not None:
            by_key.setdefault(found[0], []).append(found[1])
    claimed: set[str] = set()
    groups = []
    for members in by_key.values():
        kept, taken = [], set(claimed)
        for lin in members:
            targets = {n.target for n in (lin.weight, lin.bias) if n is not None}
            if not taken & targets:
                kept.append(lin)
                taken |= targets
        if len(kept) >= 2:  # only a fused group claims its tensors
            groups.append(kept)
            claimed = taken
    return groups


def _register(gm: fx.GraphModule, tensor: torch.Tensor, sources: list[fx.Node], like: fx.Node,
              before: fx.Node, index: int, kind: str) -> fx.Node:
    """Attach ``tensor`` to ``gm`` as a buffer and return a get_attr node for it, recording the recipe."""
    name = f"{FUSED_PREFIX}_{index}_{kind}"
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta[DERIVED_META] = ("cat", [s.target for s in sources], 0)
    mode = _fake_mode(like)
    if mode is not None:
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def _fake_mode(node: fx.Node) -> Any:
    v = val(node)
    return getattr(v, "fake_mode", None) if v is not None else None


def _set_val(node: fx.Node, mode: Any, fallback: Any = None) -> None:
    """Recompute ``node.meta['val']`` by running it on its inputs' fake values (other passes read it). Some torch
    versions cannot run a composite op on symbolic shapes; then ``fallback`` (same shape, maybe other strides)."""
    if mode is None:
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    try:
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except RuntimeError as exc:
        log.debug("fake propagation of %s failed (%s); keeping a same-shape value", node.name, exc)
        if fallback is not None:
            node.meta["val"] = fallback


def _linear_val(group: list[_Linear], mode: Any) -> Any:
    """The fused linear's fake output: the members' outputs side by side. Not ``linear`` on fake inputs: its C++
    composite (torch 2.11) calls ``numel()`` on symbolic shapes and fails."""
    if mode is None:
        return None
    with mode:
        return aten.cat.default([val(lin.node) for lin in group], -1)


def _short_name(target: str) -> str:
    """``m.model.layers.0.self_attn.q_proj.weight`` -> ``q`` (for the pass notes)."""
    parts = target.split(".")
    name = parts[-2] if len(parts) > 1 else parts[-1]
    return name[:-5] if name.endswith("_proj") and len(name) > 5 else name


def _fuse_group(gm: fx.GraphModule, group: list[_Linear], index: int) -> str:
    """Replace the group by ``split_with_sizes(linear(x, cat(W), cat(b)), sizes, -1)``; returns its label."""
    graph = gm.graph
    first, x = group[0].node, group[0].node.args[0]
    mode = _fake_mode(x)
    weights = [_attr_tensor(gm, lin.weight) for lin in group]
    sizes = [int(w.shape[0]) for w in weights]
    w_node = _register(gm, concat_shared(weights), [lin.weight for lin in group], x, first, index, "weight")
    b_node = None
    if group[0].bias is not None:
        biases = [_attr_tensor(gm, lin.bias) for lin in group]
        b_node = _register(gm, concat_shared(biases), [lin.bias for lin in group], x, first, index, "bias")
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, (x, w_node) if b_node is None else (x, w_node, b_node))
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        parts = [getitem(graph, split, i) for i in range(len(group))]
    fused.meta.update({k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace")})
    fused.meta["val"] = _linear_val(group, mode)
    _set_val(split, mode, [val(lin.node) for lin in group])
    for lin, part in zip(group, parts):
        _set_val(part, mode, val(lin.node))
        lin.node.replace_all_uses_with(part)
        graph.erase_node(lin.node)
        _reshape_views(part, mode)
    return f"[{','.join(_short_name(lin.weight.target) for lin in group)}]"


def _reshape_views(part: fx.Node, mode: Any) -> None:
    """A slice of the fused output is strided, and ``view`` can fail on strided input where ``reshape`` copies;
    the graph is functional, so the two are interchangeable here."""
    for user in list(part.users):
        if is_op(user, aten.view, aten._unsafe_view) and user.args[0] is part:
            with part.graph.inserting_before(user):
                new = part.graph.call_function(aten.reshape.default, user.args, dict(user.kwargs))
            new.meta = dict(user.meta)
            _set_val(new, mode, val(user))
            user.replace_all_uses_with(new)
            part.graph.erase_node(user)


@register_pass("fuse_gemms")
def fuse_gemms(gm: fx.GraphModule, ctx) -> PassResult:
    groups = find_groups(gm)
    labels = [_fuse_group(gm, group, i) for i, group in enumerate(groups)]
    counts = Counter(labels)
    summary = ", ".join(f"{n}x{label}" for label, n in counts.items())
    log.debug("fused %d GEMM groups: %s", len(groups), summary)
    return PassResult(len(groups), [f"{len(groups)} groups: {summary}" if groups else "no shared-input linears"])
