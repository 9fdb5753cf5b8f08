"""Turn canonical attention into the selected backends' paged cached attention.

* picks the model's backend (``select_backend``): a primary, and for layers it cannot run a fallback that
  shares its cache layout (per-layer fallback, listed in ``explain()``); records why;
* adds the step inputs (docs/contracts.md) and, per layer, one input per cache tensor the backend declares
  (``cache_names``: K and V, plus their scales with ``kv_cache_dtype="fp8"``), named ``<name>_<layer>``, each
  handed to the cached op's input of that name;
* inserts exactly ONE ``autodeploy::prepare_metadata`` node right after the inputs, deriving the union of
  the fields every layer's own backend declares; each cached-attention node reads its own, by name;
* builds each layer's cached op from that layer's backend (``layer_backend(spec).cached_attention_op()``) and
  tags the node with its layer (``node.meta["attention_layer"]``) so backend passes touch only their own layers;
* reshapes q/k/v into the flattened ``[T, H, D]`` layout around each cached op.
The mask-building subgraphs die with the canonical attention nodes and are removed.
"""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.backends import AttentionSpec
from autodeploy.backends.registry import select_backend
from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.utils import (
    add_placeholder, aten, flatten_heads, getitem, is_op, last_placeholder, placeholders, static_int, val,
)
from autodeploy.metadata import METADATA_OP_INPUTS, STEP_INPUT_NAMES
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.ops.attention import attention_inputs
from autodeploy.ops import kv_quant
from autodeploy.ops.cached import STEP_TENSORS, cached_call
from autodeploy.ops.variants import active_params, param_names


def attention_specs(gm: fx.GraphModule, dtype: torch.dtype,
                    kv_cache_dtype: str = "auto") -> list[tuple[fx.Node, AttentionSpec, dict]]:
    """Each canonical attention node, its spec (shapes and active variant parameters) and its inputs by name."""
    out = []
    for node in gm.graph.nodes:
        if not is_op(node, torch.ops.autodeploy.attention):
            continue
        inputs = attention_inputs(node)
        vq, vk, vv = val(inputs["q"]), val(inputs["k"]), val(inputs["v"])
        if vq is None or vk is None or vv is None:
            raise UnsupportedModelError(f"attention {node.name}: q/k/v shapes unknown")
        dims = [static_int(x) for x in (vq.shape[1], vk.shape[1], vq.shape[3], vv.shape[3])]
        if None in dims:
            raise UnsupportedModelError(f"attention {node.name}: head counts/dims must be static, got {vq.shape}")
        hq, hkv, d, dv = dims
        if hq % hkv:
            raise UnsupportedModelError(f"attention {node.name}: {hq} query heads not divisible by {hkv} kv heads")
        variant = {n: inputs[n] for n in param_names()}
        active = {n: (True if isinstance(v, fx.Node) else v) for n, v in active_params(variant).items()}
        spec = AttentionSpec(layer=len(out), num_heads=hq, num_kv_heads=hkv, head_dim=d, v_head_dim=dv,
                             causal=bool(inputs["causal"]), dtype=dtype, params=active,
                             kv_cache_dtype=kv_cache_dtype)
        out.append((node, spec, inputs))
    return out


@register_pass("insert_kv_cache")
def insert_kv_cache(gm: fx.GraphModule, ctx) -> PassResult:
    layers = attention_specs(gm, ctx.dtype, getattr(ctx, "kv_cache_dtype", "auto"))
    if not layers:
        detail = "; ".join(f"{n}: {why}" for n, why in ctx.unmatched_attention) or "no attention pattern found"
        raise UnsupportedModelError(f"no attention layer could be converted to a cached form ({detail})")
    specs = [s for _, s, _ in layers]
    choice = select_backend(specs, ctx.device, ctx.backend, fallback=getattr(ctx, "backend_fallback", True),
                            page_size=ctx.page_size or None)
    backend = choice.backend
    ctx.report.backend, ctx.report.backend_reason = choice.primary.name, choice.reason
    ctx.report.rejected_backends, ctx.report.backend_fallbacks = choice.rejected, choice.notes()
    ctx.attention_backend, ctx.attention_specs = backend, specs

    graph = gm.graph
    inputs = placeholders(gm)
    for name in STEP_INPUT_NAMES:
        if name not in inputs:
            inputs[name] = add_placeholder(gm, name)
    caches: list[dict[str, fx.Node]] = []
    for spec in specs:
        caches.append({n: add_placeholder(gm, f"{n}_{spec.layer}") for n in backend.cache_names(spec)})
    ctx.cache_input_names = [tuple(c.target for c in layer.values()) for layer in caches]

    fields = list(backend.model_metadata_fields(specs))
    meta: list[fx.Node] = []
    if fields:
        with graph.inserting_after(last_placeholder(gm)):
            prep = graph.call_function(
                torch.ops.autodeploy.prepare_metadata.default,
                tuple(inputs[n] for n in METADATA_OP_INPUTS) + (",".join(fields),),
            )
        with graph.inserting_after(prep):
            meta = [getitem(graph, prep, i) for i in range(len(fields))]
    step = {n: inputs[n] for n in STEP_TENSORS}
    for (node, spec, a), layer_caches in zip(layers, caches):
        runs = backend.layer_backend(spec)
        with graph.inserting_before(node):
            call = {
                "q": flatten_heads(graph, a["q"], spec.num_heads, spec.head_dim),
                "k": flatten_heads(graph, a["k"], spec.num_kv_heads, spec.head_dim),
                "v": flatten_heads(graph, a["v"], spec.num_kv_heads, spec.v_head_dim),
                **layer_caches, **step,
                "meta": [meta[fields.index(f)] for f in runs.layer_metadata_fields(spec)],
                "scale": a["scale"], **{n: a[n] for n in param_names()},
            }
            out = cached_call(graph, runs.cached_attention_op(), call)
            out.meta["attention_layer"] = spec.layer
            out = graph.call_function(aten.unsqueeze.default, (out, 0))
            out = graph.call_function(aten.transpose.int, (out, 1, 2))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    notes = [f"backend {choice.primary.name}: {choice.reason}", *choice.notes(), f"metadata fields: {fields}"]
    if specs[0].kv_cache_dtype != "auto":
        notes.append(f"kv cache {specs[0].kv_cache_dtype}: {kv_quant.SCHEME}")
    return PassResult(len(layers), notes)
