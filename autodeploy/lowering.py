"""Lowering modes after cache insertion, chosen per model and overridable: a registry, not an if-chain."""

from __future__ import annotations

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


@register_lowering("eager")
def _eager(cm: Any) -> tuple[Optional[Callable], str]:
    return cm.graph_module, "runs the cached GraphModule op by op"


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

    cm.graph_runner = CudaGraphRunner(cm, cm.graph_module, cm.max_batch_size)
    return cm.graph_module, (f"decode steps replay CUDA graphs per batch bucket {cm.graph_runner.buckets} "
                             "(captured once each, on first use); prefill/mixed steps run eager")


def lower_graph(cm: Any, mode: str) -> tuple[Optional[Callable], str]:
    if mode not in LOWERINGS:
        raise BackendUnavailableError(f"unknown lowering {mode!r}; known: {sorted(LOWERINGS)}")
    return LOWERINGS[mode](cm)
