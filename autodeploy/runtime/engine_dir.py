"""Self-contained engines on disk: ``CompiledModel.save(dir)`` and ``autodeploy.load(dir)``.

A saved engine directory holds the ONNX model with its external weights (``model.onnx``, ``model.onnx.data``),
the engine metadata (``engine.json``: input/output names, which output feeds which cache), the runtime config
(``config.json``: batch/sequence limits, page size, vocab, EOS ids, dtype, backend, the attention layers), the
tokenizer and generation config where the model has them, and ``manifest.json`` with the sha256 of every file.
``load`` verifies the manifest before reading anything, reads only JSON, ONNX and tokenizer files (nothing is
unpickled), and runs the engine in the usual runtime without the HF model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from autodeploy.backends import AttentionSpec, get_backend
from autodeploy.backends.onnxruntime import engine_files
from autodeploy.backends.onnxruntime.lowering import build_engine
from autodeploy.errors import BackendUnavailableError, ConfigError
from autodeploy.models.factory import ModelInfo

log = logging.getLogger(__name__)

CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
GENERATION_DIR = "generation"
ENGINE_FORMAT = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@dataclass
class LoadedReport:
    """``explain()`` of a loaded engine: where it came from, its backend and lowering (no passes ran)."""

    model: str = ""
    source: str = ""
    backend: str = ""
    lowering: str = ""
    lowering_reason: str = ""
    cache: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"autodeploy engine: {self.model}", f"  loaded from {self.source} (manifest verified)"]
        lines += [f"  stage {stage:<12} {secs * 1e3:9.1f} ms" for stage, secs in self.stage_seconds.items()]
        lines += [f"  backend: {self.backend}", f"  lowering: {self.lowering} ({self.lowering_reason})"]
        if self.cache:
            lines.append(f"  kv cache: {self.cache}")
        return "\n".join(lines)


def _spec_json(spec: AttentionSpec) -> dict:
    d = dataclasses.asdict(spec)
    d["dtype"] = str(spec.dtype)
    d["params"] = [[k, v] for k, v in spec.params]
    if any(not isinstance(v, (int, float, bool, str, type(None))) for _, v in spec.params):
        raise ConfigError(f"layer {spec.layer}: attention parameters {spec.params} cannot be saved as JSON")
    return d


def save_engine(cm: Any, directory: str | Path) -> Path:
    """Write ``cm`` as a self-contained engine into ``directory`` (new or empty). The ONNX is the one this
    model runs (onnxruntime backend) or is exported now (any backend whose graph has the engine form)."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} is not empty; save an engine into a new or empty directory")
    runner_dir = getattr(getattr(cm, "_runner", None), "engine_dir", None)
    src = Path(runner_dir) if runner_dir is not None else build_engine(cm)[0]
    engine_files.verify_manifest(src)
    names = [n for n in engine_files.read_json(src, engine_files.MANIFEST)["files"]]
    engine_files.copy_engine(src, directory, names)
    info = cm.info
    config = {
        "format": ENGINE_FORMAT, "backend": "onnxruntime" if cm.backend.name != "tensorrt" else "tensorrt",
        "model": getattr(info, "name", ""), "family": getattr(info, "family", ""),
        "max_batch_size": cm.max_batch_size, "max_seq_len": cm.max_seq_len, "max_num_tokens": cm.max_num_tokens,
        "page_size": cm.page_size, "num_pages": cm.num_pages, "vocab_size": cm.vocab_size,
        "eos_token_ids": list(info.eos_token_ids), "pad_token_id": getattr(info, "pad_token_id", None),
        "dtype": str(cm.dtype), "enable_prefix_caching": cm.enable_prefix_caching,
        "attention_specs": [_spec_json(s) for s in cm.ctx.attention_specs],
        "cache_input_names": [list(n) for n in cm.ctx.cache_input_names],
        "versions": engine_files.library_versions(),
    }
    (directory / CONFIG).write_text(json.dumps(config, indent=1))
    if getattr(info, "tokenizer", None) is not None:
        info.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    if getattr(info, "generation_config", None) is not None:
        info.generation_config.save_pretrained(str(directory / GENERATION_DIR))
    engine_files.write_manifest(directory)
    log.info("saved engine to %s", directory)
    return directory


def load_engine(directory: str | Path, *, device: Optional[str | torch.device] = None,
                num_pages: Optional[int] = None, max_batch_size: Optional[int] = None) -> Any:
    """A CompiledModel running the saved engine in ``directory``, without the HF model. ``device`` defaults to
    the CPU; ``num_pages`` to the saved cache size; ``max_batch_size`` (at most the saved one) to the saved one."""
    from autodeploy.runtime.compiled_model import CompiledModel

    t0 = time.perf_counter()
    directory = Path(directory)
    engine_files.verify_manifest(directory)
    config = engine_files.read_json(directory, CONFIG)
    if config.get("format") != ENGINE_FORMAT:
        raise ConfigError(f"{directory}: engine format {config.get('format')}, this autodeploy reads {ENGINE_FORMAT}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = get_backend(config["backend"])
    ok, why = backend.available(device, True)
    if not ok:
        raise BackendUnavailableError(f"engine {directory} needs backend {backend.name!r}, which cannot run here: {why}")
    dtype = _DTYPES[config["dtype"]]
    if max_batch_size is not None and not 1 <= max_batch_size <= config["max_batch_size"]:
        raise ConfigError(f"max_batch_size must be in [1, {config['max_batch_size']}], got {max_batch_size}")
    specs = [AttentionSpec(**{**s, "dtype": dtype, "params": [tuple(p) for p in s["params"]]})
             for s in config["attention_specs"]]
    report = LoadedReport(model=f"{config['model']} ({config['family']}, {len(specs)} layers, {config['dtype']})",
                          source=str(directory), backend=backend.name)
    ctx = SimpleNamespace(
        max_batch_size=max_batch_size or config["max_batch_size"], max_seq_len=config["max_seq_len"],
        max_num_tokens=config["max_num_tokens"], page_size=config["page_size"], device=device, dtype=dtype,
        backend=backend.name, report=report, attention_backend=backend, attention_specs=specs,
        cache_input_names=[tuple(n) for n in config["cache_input_names"]], engine_dir=directory,
    )
    tokenizer = generation = None
    if (directory / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
    if (directory / GENERATION_DIR).is_dir():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(str(directory / GENERATION_DIR))
    info = ModelInfo(name=config["model"], family=config["family"], vocab_size=config["vocab_size"],
                     num_layers=len(specs), dtype=dtype, device=device, eos_token_ids=config["eos_token_ids"],
                     pad_token_id=config.get("pad_token_id"), generation_config=generation, tokenizer=tokenizer)
    cm = CompiledModel(None, ctx, info, num_pages=num_pages or config["num_pages"],
                       enable_prefix_caching=config["enable_prefix_caching"])
    cm.lower("auto")
    report.stage_seconds["load"] = time.perf_counter() - t0
    return cm
