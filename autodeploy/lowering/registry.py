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


def _with_cuda_graphs(cm: Any, make_fn: Callable[[], Callable], mode: str, rest: str,
                      mixed: Optional[str] = None) -> tuple[Optional[Callable], str]:
    """Decode graphs captured over ``make_fn()`` (built only where there is a GPU). ``mixed`` says how prefill
    and mixed steps up to the largest token bucket run: ``"full"`` (one graph per token bucket; backends with
    device-composed steps, others fall back to piecewise), ``"piecewise"`` (captured pieces around eager
    attention) or None (uncaptured)."""
    if cm.device.type != "cuda" or not torch.cuda.is_available():
        log.warning("%s lowering needs a CUDA device; %s runs the eager graph instead", mode, cm.device)
        return None, f"{mode} needs a CUDA device; fell back to eager on {cm.device.type}"
    from autodeploy.backends.base import CudaGraphSupport
    from autodeploy.lowering.cudagraph import CudaGraphRunner, MixedGraphRunner

    # the weakest grade of the backends that run the model's layers (backends/layered.py), named by all of them
    grade = cm.backend.cuda_graph_support()
    label = getattr(cm.backend, "label", cm.backend.name)
    if grade == CudaGraphSupport.NONE:
        log.warning("backend %s supports no CUDA graphs; %s runs the eager graph", label, mode)
        return None, f"backend {label} supports no CUDA graphs; {mode} fell back to eager"
    if mixed is not None and grade == CudaGraphSupport.DECODE:
        log.info("backend %s supports decode-only CUDA graphs: prefill/mixed steps run uncaptured", label)
        mixed = None
    fn = make_fn()
    cm.graph_runner = CudaGraphRunner(cm, fn, cm.max_batch_size)
    if mixed == "full" and grade < CudaGraphSupport.WHOLE_STEP:
        log.info("backend %s does not run device-composed steps: mixed steps use piecewise graphs", label)
        mixed = "piecewise"
    if mixed == "full":
        runner = MixedGraphRunner(cm, fn)
        if runner.buckets:
            cm.mixed_graphs = runner
            rest = (f"up to {runner.buckets[-1]} tokens replay one CUDA graph per token bucket {runner.buckets}; "
                    f"larger ones {rest}")
        else:
            log.warning("no token bucket fits max_num_tokens %d; prefill/mixed steps %s", cm.max_num_tokens, rest)
    elif mixed == "piecewise":
        from autodeploy.lowering.piecewise import PiecewiseGraphRunner, PiecewiseUnsupported

        try:
            cm.piecewise = PiecewiseGraphRunner(cm, fn)
            rest = (f"up to {cm.piecewise.buckets[-1]} tokens replay piecewise graphs per token bucket "
                    f"{cm.piecewise.buckets} around eager attention; larger ones {rest}")
        except PiecewiseUnsupported as exc:
            log.warning("piecewise CUDA graphs unavailable (%s); prefill/mixed steps %s", exc, rest)
    return fn, (f"decode steps replay CUDA graphs per batch bucket {cm.graph_runner.buckets} "
                f"(captured at start-up); prefill/mixed steps {rest}")


@register_lowering("cudagraph")
def _cudagraph(cm: Any) -> tuple[Optional[Callable], str]:
    """Every step up to the largest bucket replays a whole-step graph (piecewise for mixed steps where the
    backend cannot compose steps on the device)."""
    return _with_cuda_graphs(cm, lambda: direct_call_module(cm.graph_module), "cudagraph", "run eager",
                             mixed="full")


@register_lowering("cudagraph-piecewise")
def _cudagraph_piecewise(cm: Any) -> tuple[Optional[Callable], str]:
    """Decode graphs, and piecewise graphs around eager attention for mixed steps (kept to compare)."""
    return _with_cuda_graphs(cm, lambda: direct_call_module(cm.graph_module), "cudagraph-piecewise", "run eager",
                             mixed="piecewise")


@register_lowering("cudagraph-decode")
def _cudagraph_decode(cm: Any) -> tuple[Optional[Callable], str]:
    """Decode graphs only: every prefill/mixed step runs eager (the pre-piecewise lowering, kept to compare)."""
    return _with_cuda_graphs(cm, lambda: direct_call_module(cm.graph_module), "cudagraph-decode", "run eager")


@register_lowering("torch-compile+cudagraph")
def _compiled_cudagraph(cm: Any) -> tuple[Optional[Callable], str]:
    """Inductor's fused kernels (one dynamic-shape compile) captured per decode bucket: fewer kernels per step
    than the eager graph and no launch overhead."""
    return _with_cuda_graphs(cm, lambda: torch.compile(cm.graph_module, dynamic=True, fullgraph=True),
                             "torch-compile+cudagraph", "run the inductor-compiled graph")


def resolve_lowering(mode: str, device: torch.device, backend: Any = None) -> str:
    """``auto``: the backend's own whole-graph lowering if it has one (``engine_lowering``: onnxruntime,
    tensorrt), else CUDA graphs for decode where there is a GPU, the eager graph elsewhere."""
    own = getattr(backend, "engine_lowering", None)
    if own is not None and mode not in ("auto", own):
        raise BackendUnavailableError(f"backend {backend.name} lowers the whole graph to an engine; lowering must "
                                      f"be 'auto' or {own!r}, not {mode!r}")
    if mode == "auto":
        return own or ("cudagraph" if device.type == "cuda" else "eager")
    return mode


def lower_graph(cm: Any, mode: str) -> tuple[Optional[Callable], str]:
    """Apply lowering ``mode`` (already resolved from ``auto``, see :func:`resolve_lowering`)."""
    if mode == getattr(cm.backend, "engine_lowering", None):
        return cm.backend.lower(cm)
    if mode not in LOWERINGS:
        raise BackendUnavailableError(f"unknown lowering {mode!r}; known: {sorted(LOWERINGS)}")
    return LOWERINGS[mode](cm)
