"""The onnxruntime lowering: the whole cached graph becomes one ONNX engine run by one InferenceSession.

``build_engine`` (shared with the TensorRT backend, which parses the same ONNX) finds the engine in the engine
cache or exports it; ``lower`` wraps it in an :class:`OrtRunner` that CompiledModel calls like any lowered graph.
A model loaded from a saved engine (``autodeploy.load``) carries its engine directory in ``ctx.engine_dir`` and
is never exported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from autodeploy.backends.onnxruntime import engine_files
from autodeploy.backends.onnxruntime.export import OPSET, engine_graph, export_onnx
from autodeploy.errors import UnsupportedModelError
from autodeploy.metadata import SequenceChunk

log = logging.getLogger(__name__)


def example_step(cm: Any) -> dict:
    """A packed two-sequence step, every dim of it above 1 (so the exporter keeps each dynamic), writing only
    into the scratch page."""
    n0 = max(2, min(3, cm.max_seq_len))
    pages = cm.scratch_pages(n0)
    pages = pages + pages[:1] if len(pages) < 2 else pages
    batch = cm.packer.pack([SequenceChunk([0] * n0, 0, pages), SequenceChunk([0] * 2, 0, pages)])
    return dict(batch.inputs, **cm.caches)


def build_engine(cm: Any, cache_dir: Optional[Path] = None) -> tuple[Path, dict, str]:
    """The engine directory for ``cm`` (from the engine cache, or exported now), its engine metadata, and a note
    for ``explain()``. ``cache_dir`` defaults to ``<ctx.cache_dir>/engines``, else
    :func:`engine_files.default_cache_dir`."""
    loaded = getattr(cm.ctx, "engine_dir", None)
    if loaded is not None:
        return Path(loaded), engine_files.read_json(Path(loaded), engine_files.ENGINE_META), f"loaded from {loaded}"
    if cm.graph_module is None:
        raise UnsupportedModelError("no graph to export and no engine directory to load")
    eg = engine_graph(cm.graph_module)
    example = example_step(cm)
    if cache_dir is None and getattr(cm.ctx, "cache_dir", None):  # compile(cache_dir=...), once the context has it
        cache_dir = Path(cm.ctx.cache_dir) / "engines"
    cache_dir = cache_dir if cache_dir is not None else engine_files.default_cache_dir()
    key = engine_files.graph_key(eg.module, {n: example[n] for n in eg.input_names}, {"opset": OPSET})
    entry = engine_files.lookup(cache_dir, key)
    if entry is not None:
        return entry, engine_files.read_json(entry, engine_files.ENGINE_META), f"engine cache hit {entry}"
    meta = {"format": engine_files.FORMAT_VERSION, "opset": OPSET, "key": key, "inputs": eg.input_names,
            "outputs": eg.output_names, "cache_outputs": eg.cache_outputs,
            "versions": engine_files.library_versions()}

    def build(directory: Path) -> None:
        import json

        t0 = time.perf_counter()
        try:
            export_onnx(eg, example, directory / engine_files.MODEL_FILE)
        except UnsupportedModelError:
            raise
        except Exception as exc:  # the exporter's errors are deep; name the stage and the cause
            raise UnsupportedModelError(f"ONNX export of the compiled graph failed: {type(exc).__name__}: "
                                        f"{str(exc)[:2000]}") from exc
        cm.report.stage_seconds["onnx export"] = time.perf_counter() - t0
        (directory / engine_files.ENGINE_META).write_text(json.dumps(meta, indent=1))

    entry, cached = engine_files.store(cache_dir, key, build)
    note = f"exported to {entry}" + ("" if cached else " (engine cache off)")
    return entry, meta, note


def lower(cm: Any) -> tuple[Any, str]:
    """The engine for ``cm`` and an :class:`OrtRunner` over it: ``(runner, reason for explain())``."""
    from autodeploy.backends.onnxruntime.runner import OrtRunner

    entry, meta, note = build_engine(cm)
    t0 = time.perf_counter()
    runner = OrtRunner(entry / engine_files.MODEL_FILE, meta["cache_outputs"], cm.device, engine_dir=entry)
    cm.report.stage_seconds["session"] = time.perf_counter() - t0
    return runner, (f"whole graph as one ONNX engine (opset {meta['opset']}) in an onnxruntime session "
                    f"({', '.join(runner.providers)}); {note}")
