"""``autodeploy.compile``: HF model -> export -> passes -> cached graph -> lowering -> CompiledModel."""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

import autodeploy.ops  # noqa: F401  (registers the canonical ops)
from autodeploy import distributed as _distributed
from autodeploy.compiler import compile_cache
from autodeploy.compiler.context import CompileContext
from autodeploy.compiler.pass_manager import PassManager
from autodeploy.compiler.pipeline import Pipeline, PassSpec, as_pipeline
from autodeploy.compiler.report import CompileReport
from autodeploy.errors import ConfigError
from autodeploy.graph.passes import PASSES
from autodeploy.ops.kv_quant import resolve_kv_cache_dtype
from autodeploy.models import shard_loading
from autodeploy.models.stateful import is_stateful, refusals_name_unrewritten, rewrite_mixers
from autodeploy.passes.match_moe import DERIVE_OPS as _MOE_RECIPES
from autodeploy.passes.quantize_linears import DERIVE_OPS as _QUANT_RECIPES, resolve_quantization

# Quantized weights and stacked expert views are rebuilt from the caller's model tensors on a cache hit (never
# stored: an entry serves any weights of one architecture).
compile_cache.register_derive_ops(_QUANT_RECIPES)
compile_cache.register_derive_ops(_MOE_RECIPES)

log = logging.getLogger(__name__)


def _restore(ctx: CompileContext, state: dict, page_size: Optional[int]):
    """Fill the context from a compile-cache entry (what the passes would have recorded)."""
    from autodeploy.backends import AttentionSpec
    from autodeploy.compiler.report import PassRecord

    ctx.attention_specs = [AttentionSpec(**{**s, "dtype": ctx.dtype}) for s in state["specs"]]
    ctx.attention_backend = _restore_layers(state["backend_obj"], state.get("layer_backends"))
    ctx.cache_input_names = [tuple(x) for x in state["cache_input_names"]]
    ctx.page_size = page_size or state["page_size"]
    ctx.report.backend, ctx.report.backend_reason = state["backend"], state["backend_reason"]
    ctx.report.rejected_backends = state["rejected"]
    ctx.report.backend_fallbacks = list(state.get("backend_fallbacks", []))
    ctx.report.passes = [PassRecord(**p) for p in state["passes"]]
    ctx.report.kernels = list(state.get("kernels", []))
    return state["graph"]


def _restore_layers(primary, names: Optional[Sequence[str]]):
    """The model's backend from a cache entry: the primary, or its per-layer combination (``layer_backends``:
    each attention layer's backend name). A backend no longer registered makes the entry unusable (KeyError)."""
    if not names:
        return primary
    from autodeploy.backends import get_backend, list_backends
    from autodeploy.backends.layered import LayeredBackend

    known = set(list_backends())
    if not set(names) <= known:
        raise KeyError(f"the entry's layers run on unregistered backends {sorted(set(names) - known)}")
    return LayeredBackend(primary, [get_backend(n) for n in names])


def _layer_backend_names(ctx: CompileContext) -> Optional[list[str]]:
    """Each attention layer's backend name when they differ (stored in a compile-cache entry), else None."""
    backend = ctx.attention_backend
    if len(backend.involved()) == 1:
        return None
    return [backend.layer_backend(spec).name for spec in ctx.attention_specs]


def _plugin_hashes(pipeline: Pipeline, backend: str, kernels: Union[str, Sequence[str]]) -> Optional[dict[str, str]]:
    """Code hashes of the out-of-tree code this compile may run: the requested backend (every registered one
    for ``auto``, whose kernel passes may run too), the kernel providers asked for, and every pipeline pass.
    None if some code cannot be hashed (then the compile is not cached)."""
    from autodeploy.backends import get_backend, list_backends

    names = list_backends() if backend == "auto" or kernels == "auto" else [backend, *kernels]
    objs = {f"backend:{n}": get_backend(n) for n in dict.fromkeys(names)}
    objs.update({f"pass:{e.name}": PASSES[e.name] for e in pipeline})
    hashes = {}
    for label, obj in objs.items():
        digest = compile_cache.code_hash(obj)
        if digest is None:
            log.info("compile cache off: the code of %s has no source files to hash", label)
            return None
        if digest:
            hashes[label] = digest
    return hashes


def _run_backend_passes(gm, ctx: CompileContext, kernels, report: CompileReport, dump_dir) -> None:
    """The chosen attention backend's own passes, then the kernel fusions of every available provider."""
    from autodeploy.backends.registry import kernel_passes

    fns = list(ctx.attention_backend.graph_passes())
    extra, notes = kernel_passes(ctx.device, ctx.attention_backend, kernels)
    names = [fn.pass_name for fn in fns]
    names += [fn.pass_name for fn in extra if fn.pass_name not in names]
    report.kernels = list(notes)
    for note in notes:
        log.info("%s", note)
    if names:  # recorded like any other pass
        PassManager(names, report, dump_dir).run(gm, ctx)


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
    passes: Optional[Union[Pipeline, Iterable[PassSpec]]] = None,
    kernels: Union[str, Sequence[str]] = "auto",
    quantization: Optional[Union[str, Any]] = None,
    kv_cache_dtype: Optional[str] = None,
    tensor_parallel_size: int = 1,
    backend_fallback: bool = True,
) -> "CompiledModel":
    """Compile an HF causal LM (instance or local checkpoint directory) into a paged-KV inference graph.

    ``backend``: attention backend name or ``"auto"`` (chosen per model, see ``explain()``).
    ``backend_fallback``: layers the backend cannot run (e.g. chunked attention on triton) run on the
    highest-priority backend that can and shares its cache layout; ``explain()`` lists them and the CUDA-graph
    grade becomes the weakest involved. ``False`` refuses such a model instead (with ``backend="auto"``: picks a
    backend that runs every layer).
    ``lowering``: ``"auto"`` (``cudagraph`` on a GPU, else ``eager``), ``"eager"``, ``"torch-compile"``,
    ``"cudagraph"`` (decode graphs per batch bucket, piecewise graphs for prefill/mixed steps),
    ``"cudagraph-decode"`` (decode graphs only) or ``"torch-compile+cudagraph"``.
    ``cache_dir``: reuse/store the compiled graph there (default: ``$AUTODEPLOY_CACHE_DIR`` if set, else no
    cache); a hit skips export and the passes.
    ``warmup``: on a GPU, run one dummy mixed step after lowering (``CompiledModel.warmup``) so kernels JIT-compile
    at start-up instead of inside the first requests.
    ``passes``: the pipeline (a :class:`Pipeline`, or a list of pass names / ``(name, {option: value})`` pairs;
    default ``Pipeline.default()``). Unknown names or options are a ``ConfigError`` before anything runs.
    ``kernels``: which backends' model-level kernel fusions run: ``"auto"`` (every backend available on the
    device), a list of backend names, or ``[]`` for none. The chosen attention backend's own passes always run.
    ``quantization``: ``"fp8"``, ``"int8"``, ``"int8-weight"`` or a ``QuantizationConfig`` (calibration, ignore
    list...); None keeps the weights as they are (a pre-quantized checkpoint keeps its own). See
    docs/quantization.md.
    ``kv_cache_dtype``: ``"auto"``/None (the model dtype) or ``"fp8"``: E4M3 pages with per-(token, kv-head)
    scales, dequantized inside the attention kernels (autodeploy/ops/kv_quant.py); a backend that cannot read
    it refuses the model.
    ``tensor_parallel_size``: shard the model over N ranks (``shard_tensor_parallel``; gloo on CPU, NCCL on
    CUDA). The library spawns ranks 1..N-1 and this process becomes rank 0, or, under torchrun, every rank
    calls compile itself (rank 0 gets the model, the others serve it and exit). From a safetensors checkpoint
    directory each rank reads only its shard (``models/shard_loading.py``). See docs/user-guide.md.
    """
    rank_options = {k: v for k, v in locals().items() if k not in ("model", "tensor_parallel_size")}
    from autodeploy.runtime.compiled_model import CompiledModel
    from autodeploy.models import export_model, load_model, model_info

    if max_batch_size < 1 or max_seq_len < 2:
        raise ValueError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got {max_batch_size}, {max_seq_len}")
    pipeline = as_pipeline(passes)
    tp = _distributed.resolve(tensor_parallel_size, device)
    shard_from, whole_why = None, ""  # tensor parallelism: the checkpoint each rank reads its shard from
    if tensor_parallel_size > 1 and tp is None:  # the caller: start the ranks, become rank 0
        build = functools.partial(compile, model, tensor_parallel_size=tensor_parallel_size, **rank_options)
        return _distributed.launch(build, tensor_parallel_size, torch.device(device) if device is not None else None)
    if tp is not None and tp.world_size > 1:
        pipeline.insert_before("insert_kv_cache", ("shard_tensor_parallel", {
            "world_size": tp.world_size, "rank": tp.rank, "group_name": tp.group_name}))
        cache_dir = ""  # no compile cache: entries do not record the shard (falsy, so $AUTODEPLOY_CACHE_DIR stays off)
        # A checkpoint directory: this rank builds the model on deferred weights and reads only its slices after
        # the passes (models/shard_loading.py). Otherwise every rank loads the whole model, and explain() says why.
        whole_why = shard_loading.unsupported_reason(model) or (
            "int8 calibration runs the whole HF model" if getattr(quantization, "calibration", None) else "")
        shard_from = None if whole_why else os.fspath(model)
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
    if kernels != "auto" and (isinstance(kernels, str) or not all(isinstance(k, str) for k in kernels)):
        raise ConfigError(f"kernels must be 'auto' or a list of backend names, got {kernels!r}")
    kernels = kernels if kernels == "auto" else list(kernels)
    report = CompileReport()
    # Validates every name and option now, before loading or exporting anything.
    manager = PassManager(pipeline, report, dump_dir)
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else None
    hf_model, tokenizer = load_model(model, dtype=dtype, device=device, deferred_weights=shard_from is not None)
    info = model_info(hf_model, tokenizer)
    report.model = f"{info.name} ({info.family}, {info.num_layers} layers, {info.dtype})"
    report.loading = list(info.load_notes)
    if whole_why:
        report.loading.append(f"weights: the whole model loaded on every rank, then sliced ({whole_why})")
    backend = backend if backend != "auto" else info.defaults.get("backend", "auto")
    max_num_tokens = max_num_tokens or max(max_seq_len, 2048)
    quant = resolve_quantization(quantization, hf_model, info.device)
    if quant is not None and not quant.prequantized and "quantize_linears" not in pipeline.names:
        raise ConfigError(f"quantization={quant.mode!r} needs the quantize_linears pass; the pipeline is {pipeline.names}")
    report.stage_seconds["load"] = time.perf_counter() - t0

    ctx = CompileContext(
        max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
        page_size=page_size or 0, device=info.device, dtype=info.dtype, backend=backend, report=report,
        backend_fallback=bool(backend_fallback),
        quantization=quant, kv_cache_dtype=kv_cache_dtype,
    )
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("AUTODEPLOY_CACHE_DIR")
    ctx.cache_dir = str(cache_dir) if cache_dir else None
    entry_path = None
    plugins = _plugin_hashes(pipeline, backend, kernels) if cache_dir else None
    if cache_dir and is_stateful(hf_model):  # TODO: store the state specs in the entry
        log.info("compile cache off: stateful mixers (their state layout is not stored in cache entries)")
        plugins = None
    if cache_dir and plugins is not None:
        options = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, max_num_tokens=max_num_tokens,
                       backend=backend, page_size=page_size, pipeline=pipeline.describe(), kernels=kernels,
                       quantization=quant.describe() if quant is not None else None)
        if kv_cache_dtype != "auto":  # (keys of default compiles stay as they were)
            options["kv_cache_dtype"] = kv_cache_dtype
        if not backend_fallback:
            options["backend_fallback"] = False
        entry_path = compile_cache.entry_path(cache_dir, compile_cache.cache_key(hf_model, options, plugins))
    t0 = time.perf_counter()
    state = compile_cache.load(entry_path, hf_model) if entry_path is not None else None
    gm = None
    if state is not None:
        try:
            gm = _restore(ctx, state, page_size)
        except (KeyError, TypeError, ValueError) as exc:  # written by another version of the context/specs
            log.warning("compile cache entry %s does not restore (%s: %s); recompiling", entry_path,
                        type(exc).__name__, exc)
            ctx.report.passes.clear()
    if gm is not None:
        report.cache_hit = str(entry_path)
        report.quantization = state.get("quantization", "")
        report.stage_seconds["cache load"] = time.perf_counter() - t0
    else:
        with refusals_name_unrewritten(report.loading):
            with rewrite_mixers(hf_model, report.loading):  # stateful mixers -> canonical ops, for the export only
                gm = export_model(hf_model, max_batch_size, max_seq_len, max_num_tokens)
            report.stage_seconds["export"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            manager.run(gm, ctx)
        if ctx.attention_backend is None:
            raise ConfigError(f"the pipeline {pipeline.names} never inserted the KV cache (insert_kv_cache)")
        ctx.page_size = page_size or ctx.attention_backend.default_page_size
        if shard_from is not None:  # this rank reads its slices of the checkpoint now; backend passes see real weights
            stats = shard_loading.materialize(gm, hf_model, shard_from, compile_cache.derive_ops(), info.device)
            gm.meta["shard_loading"] = stats.as_dict()
            report.loading.append(stats.note())
        _run_backend_passes(gm, ctx, kernels, report, dump_dir)
        report.stage_seconds["passes"] = time.perf_counter() - t0
        if entry_path is not None:
            extra = {"quantization": report.quantization}
            layer_names = _layer_backend_names(ctx)
            if layer_names:
                extra.update(layer_backends=layer_names, backend_fallbacks=list(report.backend_fallbacks))
            compile_cache.save(entry_path, gm, hf_model, ctx, extra=extra)

    cm = CompiledModel(gm, ctx, info, num_pages=num_pages, memory_fraction=memory_fraction,
                       enable_prefix_caching=enable_prefix_caching)
    t0 = time.perf_counter()
    cm.lower(lowering)
    report.stage_seconds["lowering"] = time.perf_counter() - t0
    if warmup and cm.device.type == "cuda":
        log.info("warming up: one dummy prefill + decode step (first-use kernel compiles)")
        report.stage_seconds["warmup"] = cm.warmup()
    log.info("compiled %s with backend=%s lowering=%s", info.name, report.backend, report.lowering)
    return _distributed.finish(cm, tp) if tp is not None else cm
