"""Export a compiled (cached) graph to ONNX through torch.onnx's dynamo exporter.

Two steps: :func:`engine_graph` rewrites a copy of the graph into the engine form (each cached-attention call
becomes the functional ``engine_paged_attention``, each layer's new K/V rows become graph outputs: see ops.py),
then :func:`export_onnx` runs ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` with the
onnxscript translations of translations.py and dynamic token / sequence / page dims.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from autodeploy.errors import UnsupportedModelError
from autodeploy.ops.cached import STEP_TENSORS, cached_inputs, cached_op_info, is_cached_attention

log = logging.getLogger(__name__)

OPSET = 23
LOGITS = "logits"
# Engine inputs whose dims vary per step (by name), and which dims: everything else is static.
_DYNAMIC_DIMS = {
    "input_ids": {1: "tokens"}, "position_ids": {1: "tokens"}, "slot_mapping": {0: "tokens"},
    "logits_index": {0: "logits_rows"}, "cu_seqlens_q": {0: "seqs_plus_1"}, "seq_lens_kv": {0: "seqs"},
    "page_table": {0: "seqs", 1: "pages_per_seq"},
}
# Variant parameters the ONNX attention translation runs (translations.engine_paged_attention).
ENGINE_VARIANTS = frozenset({"sliding_window", "logit_softcap"})
_STANDARD_INPUTS = frozenset({"q", "k", "v", "k_cache", "v_cache", "meta", *STEP_TENSORS})
EXPORT_CALLS = 0  # how many ONNX exports this process ran (tests check that an engine-cache hit skips them)


def new_rows_name(cache_name: str) -> str:
    """Engine output holding the new K (or V) rows of cache input ``cache_name``."""
    return f"{cache_name}_new"


@dataclass
class EngineGraph:
    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    cache_outputs: dict[str, str] = field(default_factory=dict)  # cache input -> its new-rows output


def _meta_by_name(meta: list[fx.Node]) -> dict[str, fx.Node]:
    """Each derived-field node by its field name (read off the one prepare_metadata node's field list)."""
    out = {}
    for node in meta:
        prep, index = node.args if node.op == "call_function" and len(node.args) == 2 else (None, None)
        if not isinstance(prep, fx.Node) or "prepare_metadata" not in str(prep.target):
            raise UnsupportedModelError(f"cached attention reads {node.name}, not a prepare_metadata output")
        out[prep.args[-1].split(",")[index]] = node
    return out


def engine_graph(gm: fx.GraphModule) -> EngineGraph:
    """The engine form of ``gm`` (a copy sharing its tensors): every cached-attention call (it writes the cache)
    becomes ``engine_paged_attention`` (it does not), read by name through the shared cached-op schema."""
    import autodeploy.backends.onnxruntime.ops  # noqa: F401

    graph = copy.deepcopy(gm.graph)
    cache_outputs: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if not is_cached_attention(node):
            continue
        info = cached_op_info(node.target)
        extras = set(info.tensor_inputs) - _STANDARD_INPUTS - set(info.optional_inputs)
        if extras:
            raise UnsupportedModelError(f"{node.name}: {node.target} takes inputs {sorted(extras)} that the engine "
                                        "form does not know")
        a = cached_inputs(node)
        used = sorted(n for n in info.optional_inputs if a[n] is not None)
        if used:  # e.g. the scales of kv_cache_dtype="fp8"
            raise UnsupportedModelError(f"{node.name}: the engine form keeps K/V in the model dtype; the cache "
                                        f"inputs {used} (kv_cache_dtype='fp8') have no ONNX form")
        a = {n: v for n, v in a.items() if n not in info.optional_inputs}
        active = {n for n, v in a.items() if n not in _STANDARD_INPUTS | {"scale"} and v is not None}
        if active - ENGINE_VARIANTS:
            raise UnsupportedModelError(f"{node.name}: variant parameters {sorted(active - ENGINE_VARIANTS)} have "
                                        f"no ONNX form (the engine runs {sorted(ENGINE_VARIANTS)})")
        fields = _meta_by_name(a["meta"])
        missing = {"seq_idx", "tok_offset", "q_abs_pos"} - set(fields)
        if missing:
            raise UnsupportedModelError(f"{node.name}: the engine form needs metadata fields {sorted(missing)}, "
                                        f"which {node.target} does not read (compile with backend='onnxruntime' "
                                        "or 'torch' to export or save an engine)")
        kwargs = dict(q=a["q"], k=a["k"], v=a["v"], k_cache=a["k_cache"], v_cache=a["v_cache"],
                      cu_seqlens_q=a["cu_seqlens_q"], seq_lens_kv=a["seq_lens_kv"], page_table=a["page_table"],
                      seq_idx=fields["seq_idx"], tok_offset=fields["tok_offset"], q_abs_pos=fields["q_abs_pos"],
                      scale=a["scale"], sliding_window=a["sliding_window"], logit_softcap=a["logit_softcap"])
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.autodeploy.engine_paged_attention.default, kwargs=kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        cache_outputs[a["k_cache"].target], cache_outputs[a["v_cache"].target] = a["k"], a["v"]
    if not cache_outputs:
        raise UnsupportedModelError("the graph holds no cached attention to export")
    out_node = graph.output_node()
    outs = out_node.args[0]
    logits = outs[0] if isinstance(outs, (tuple, list)) else outs
    names = list(cache_outputs)
    out_node.args = ((logits, *(cache_outputs[n] for n in names)),)
    graph.eliminate_dead_code()
    module = fx.GraphModule(gm, graph).eval()
    inputs = [n.target for n in graph.nodes if n.op == "placeholder"]
    return EngineGraph(module, inputs, [LOGITS, *(new_rows_name(n) for n in names)],
                       {n: new_rows_name(n) for n in names})


def dynamic_shapes(example: dict[str, torch.Tensor], cache_names: list[str]) -> dict[str, Any]:
    dyn = torch.export.Dim.DYNAMIC
    spec: dict[str, Any] = {}
    for name, tensor in example.items():
        if name in _DYNAMIC_DIMS:
            spec[name] = {d: dyn for d in _DYNAMIC_DIMS[name]}
        elif name in cache_names:
            spec[name] = {0: dyn}  # the number of pages is a runtime choice
        else:
            spec[name] = None
    return spec


def export_onnx(eg: EngineGraph, example: dict[str, torch.Tensor], path: Path) -> Path:
    """Export ``eg`` to ``path`` (an ``.onnx`` file plus its external-weights file beside it)."""
    from autodeploy.backends.onnxruntime.translations import translation_table

    table = translation_table()
    untranslated = sorted({str(n.target) for n in eg.module.graph.nodes if n.op == "call_function"
                           and getattr(n.target, "namespace", None) == "autodeploy" and n.target not in table})
    if untranslated:  # e.g. a backend's fused kernel or a quantized linear: refuse before the exporter's trace
        raise UnsupportedModelError(f"ops {untranslated} have no ONNX translation (translations.py knows "
                                    f"{sorted(str(t) for t in table)})")
    global EXPORT_CALLS
    EXPORT_CALLS += 1
    t0 = time.perf_counter()
    example = {n: example[n] for n in eg.input_names}
    cache_names = list(eg.cache_outputs)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            eg.module, (), kwargs=example, dynamo=True, opset_version=OPSET,
            custom_translation_table=table, dynamic_shapes=dynamic_shapes(example, cache_names),
            input_names=eg.input_names, output_names=eg.output_names, optimize=True, verify=False, verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=True)
    log.info("exported %s to ONNX in %.1f s", path.name, time.perf_counter() - t0)
    return path
