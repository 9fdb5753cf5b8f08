"""Triton backend: fold ``autodeploy::rope`` into the cached attention so one kernel rotates q/k and writes
K/V into the paged cache (the rotated K never round-trips through memory before the cache write)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from autodeploy.graph.utils import aten, flatten_heads, is_op, unflatten_source, val
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.ops.cached import cached_call, cached_inputs


def _rope_output(x, index: int):
    src = unflatten_source(x)
    if is_op(src, operator.getitem) and src.args[1] == index and is_op(src.args[0], torch.ops.autodeploy.rope):
        return src.args[0]
    return None


def _own_layer(node: fx.Node, ctx) -> bool:
    """Whether the backend that runs this node's layer asked for this pass (a model whose layers run on
    different backends: each backend's passes touch only its own layers, insert_kv_cache tags each cached op
    with its layer). Untagged nodes (a graph built by hand) are judged by their op alone."""
    layer = node.meta.get("attention_layer")
    backend = getattr(ctx, "attention_backend", None)
    specs = getattr(ctx, "attention_specs", None) or []
    if layer is None or backend is None or not 0 <= layer < len(specs):
        return True
    passes = backend.layer_backend(specs[layer]).graph_passes()
    return any(getattr(fn, "pass_name", None) == "fuse_rope_cache_write" for fn in passes)


@register_pass("fuse_rope_cache_write")
def fuse_rope_cache_write(gm: fx.GraphModule, ctx) -> PassResult:
    from autodeploy.backends.triton import ops  # noqa: F401

    result = PassResult()
    graph = gm.graph
    for node in list(graph.nodes):
        if not is_op(node, torch.ops.autodeploy.triton_cached_attention) or not _own_layer(node, ctx):
            continue
        inputs = cached_inputs(node)
        qf, kf = inputs["q"], inputs["k"]
        rope_q, rope_k = _rope_output(qf, 0), _rope_output(kf, 1)
        if rope_q is None or rope_q is not rope_k:
            continue
        q_raw, k_raw, cos, sin = rope_q.args
        hq, d = qf.args[1][1], qf.args[1][2]
        hkv = kf.args[1][1]
        rot = val(cos).shape[-1] if val(cos) is not None else d
        with graph.inserting_before(node):
            inputs["q"] = flatten_heads(graph, q_raw, hq, d)
            inputs["k"] = flatten_heads(graph, k_raw, hkv, d)
            inputs["cos"] = graph.call_function(aten.reshape.default, (cos, [-1, rot]))
            inputs["sin"] = graph.call_function(aten.reshape.default, (sin, [-1, rot]))
            new = cached_call(graph, torch.ops.autodeploy.triton_cached_attention_rope.default, inputs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        result.num_matches += 1
    return result
