"""``autodeploy.compile``: HF model -> export -> passes -> cached graph -> lowering -> CompiledModel."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

import autodeploy.ops  # noqa: F401  (registers the canonical ops)
from autodeploy.compiler import compile_cache
from autodeploy.compiler.context import CompileContext
from autodeploy.compiler.pass_manager import PassManager
from autodeploy.compiler.pipeline import DEFAULT_PASSES
from autodeploy.compiler.report import CompileReport

log = logging.getLogger(__name__)


def _restore(ctx: CompileContext, state: dict, page_size: Optional[int]):
    """Fill the context from a compile-cache entry (what the passes would have recorded)."""
    from autodeploy.backends import AttentionSpec
    from autodeploy.compiler.report import PassRecord

    ctx.attention_backend = state["backend_obj"]
    ctx.attention_specs = [AttentionSpec(**{**s, "dtype": ctx.dtype}) for s in state["specs"]]
    ctx.cache_input_names = [tuple(x) for x in state["cache_input_names"]]
    ctx.page_size = page_size or state["page_size"]
    ctx.report.backend, ctx.report.backend_reason = state["backend"], state["backend_reason"]
    ctx.report.rejected_backends = state["rejected"]
    ctx.report.passes = [PassRecord(**p) for p in state["passes"]]
    return state["graph"]


def _import_passes() -> None:
    import importlib

    for name in DEFAULT_PASSES:
        importlib.import_module(f"autodeploy.passes.{name}")


def compile(
    model: Any,
    *,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    max_num_tokens: Optional[int] = None,
    backend: str = "auto",
    lowering: str = "auto",
    dtype: Optional[torch.dtype] = None,
    device: Optional[str | torch.device] = None,
    page_size: Optional[int] = None,
    num_pages: Optional[int] = None,
    memory_fraction: float = 0.85,
    enable_prefix_caching: bool = True,
    dump_dir: Optional[str | Path] = None,
    cache_dir: Optional[str | Path] = None,
    warmup: bool = True,
) -> "CompiledModel":
    """Compile an HF causal LM (instance or local checkpoint directory) into a paged-KV inference graph.

    ``backend``: attention backend name or ``"auto"`` (chosen per model, see ``explain()``).
    ``lowering``: ``"auto"`` (``cudagraph`` on a GPU, else ``eager``), ``"eager"``, ``"torch-compile"``,
    ``"cudagraph"`` (decode graphs per batch bucket, piecewise graphs for prefill/mixed steps),
    ``"cudagraph-decode"`` (decode graphs only) or ``"torch-compile+cudagraph"``.
    ``cache_dir``: reuse/store the compiled graph there (default: ``$AUTODEPLOY_CACHE_DIR`` if set, else no
    cache); a hit skips export and the passes.
    ``warmup``: on a GPU, run one dummy mixed step after lowering (``CompiledModel.warmup``) so kernels JIT-compile
    at start-up instead of inside the first requests.
    """
    from autodeploy.runtime.compiled_model import CompiledModel
    from autodeploy.models import export_model, load_model, model_info

    if max_batch_size < 1 or max_seq_len < 2:
        raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
    _import_passes()
    report = CompileReport()
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else None
    hf_model, tokenizer = load_model(model, dtype=dtype, device=device)
    info = model_info(hf_model, tokenizer)
    report.model = f"{info.name} ({info.family}, {info.num_layers} layers, {info.dtype})"
    backend = backend if backend != "auto" else info.defaults.get("backend", "auto")
    max_num_tokens = max_num_tokens or max(max_seq_len, 2048)
    report.stage_seconds["load"] = time.perf_counter() - t0

    ctx = CompileContext(
        max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
        page_size=page_size or 0, device=info.device, dtype=info.dtype, backend=backend, report=report,
    )
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("AUTODEPLOY_CACHE_DIR")
    entry_path = None
    if cache_dir:
        options = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                       backend=backend, page_size=page_size)
        entry_path = Path(cache_dir) / f"{compile_cache.cache_key(hf_model, options)}.pt"
    t0 = time.perf_counter()
    state = compile_cache.load(entry_path, hf_model) if entry_path is not None else None
    if state is not None:
        gm = _restore(ctx, state, page_size)
        report.cache_hit = str(entry_path)
        report.stage_seconds["cache load"] = time.perf_counter() - t0
    else:
        gm = export_model(hf_model, max_batch_size, max_seq_len, max_num_tokens)
        report.stage_seconds["export"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        PassManager(DEFAULT_PASSES, report, dump_dir).run(gm, ctx)
        ctx.page_size = page_size or ctx.attention_backend.default_page_size
        backend_passes = [fn.pass_name for fn in ctx.attention_backend.graph_passes()]
        if backend_passes:  # backend-specific fusions, recorded like any other pass
            PassManager(backend_passes, report, dump_dir).run(gm, ctx)
        report.stage_seconds["passes"] = time.perf_counter() - t0
        if entry_path is not None:
            compile_cache.save(entry_path, gm, hf_model, ctx)

    cm = CompiledModel(gm, ctx, info, num_pages=num_pages, memory_fraction=memory_fraction,
                       enable_prefix_caching=enable_prefix_caching)
    t0 = time.perf_counter()
    cm.lower(lowering)
    report.stage_seconds["lowering"] = time.perf_counter() - t0
    if warmup and cm.device.type == "cuda":
        log.info("warming up: one dummy prefill + decode step (first-use kernel compiles)")
        report.stage_seconds["warmup"] = cm.warmup()
    log.info("compiled %s with backend=%s lowering=%s", info.name, report.backend, report.lowering)
    return cm
