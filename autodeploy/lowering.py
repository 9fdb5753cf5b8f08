"""Lowering modes after cache insertion, chosen per model and overridable: a registry, not an if-chain."""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional

import torch

from autodeploy.errors import BackendUnavailableError

log = logging.getLogger(__name__)

Lowering = Callable[[Any], tuple[Optional[Callable], str]]
LOWERINGS: dict[str, Lowering] = {}


def register_lowering(name: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        LOWERINGS[name] = fn
        return fn

    return deco


def direct_call_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) whose ``autodeploy::*`` custom-op calls go straight to their
    Python implementations. The dispatcher round trip of a torch.library op costs tens of microseconds per
    call; eager steps make hundreds of such calls. ``cm.graph_module`` keeps the real ops (export, compile)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # private API moved: keep the dispatcher path
        return gm
    graph = copy.deepcopy(gm.graph)
    swapped = 0
    for node in graph.nodes:
        name = getattr(getattr(node.target, "_schema", None), "name", "")
        if node.op == "call_function" and name.startswith("autodeploy::") and name in OPDEFS:
            node.target = OPDEFS[name]._init_fn
            swapped += 1
    if not swapped:
        return gm
    fast = torch.fx.GraphModule(gm, graph)
    return fast


@register_lowering("eager")
def _eager(cm: Any) -> tuple[Optional[Callable], str]:
    return direct_call_module(cm.graph_module), "runs the cached GraphModule op by op (custom ops called directly)"


@register_lowering("torch-compile")
def _torch_compile(cm: Any) -> tuple[Optional[Callable], str]:
    compiled = torch.compile(cm.graph_module, dynamic=True, fullgraph=True)
    return compiled, "inductor on the non-attention parts; attention and metadata stay opaque custom ops"


@register_lowering("cudagraph")
def _cudagraph(cm: Any) -> tuple[Optional[Callable], str]:
    if cm.device.type != "cuda" or not torch.cuda.is_available():
        log.warning("cudagraph lowering needs a CUDA device; %s runs the eager graph instead", cm.device)
        return None, f"cudagraph needs a CUDA device; fell back to eager on {cm.device.type}"
    from autodeploy.cudagraph import CudaGraphRunner

    fast = direct_call_module(cm.graph_module)
    cm.graph_runner = CudaGraphRunner(cm, fast, cm.max_batch_size)
    return fast, (f"decode steps replay CUDA graphs per batch bucket {cm.graph_runner.buckets} "
                             "(captured once each, on first use); prefill/mixed steps run eager")


def lower_graph(cm: Any, mode: str) -> tuple[Optional[Callable], str]:
    if mode not in LOWERINGS:
        raise BackendUnavailableError(f"unknown lowering {mode!r}; known: {sorted(LOWERINGS)}")
    return LOWERINGS[mode](cm)
