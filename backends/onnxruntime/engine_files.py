"""Engine directories on disk: the ONNX model with external weights plus a JSON manifest holding the sha256 of
every file. Loading verifies each hash first and reads only JSON, ONNX and (for a saved engine) tokenizer files:
nothing is ever unpickled. The engine cache keeps one such directory per key (graph hash, tensors, library
versions, autodeploy source), so a second compile of the same model skips the ONNX export."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import fx

from autodeploy.errors import AutoDeployError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINE_META = "engine.json"  # input/output names and how new-KV outputs map to caches
MODEL_FILE = "model.onnx"
_SOURCE_HASH: Optional[str] = None


class EngineIntegrityError(AutoDeployError):
    """An engine directory's files do not match its manifest (corrupt, truncated or tampered with)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict:
    """Hash every file under ``directory`` (the manifest itself excepted) into ``manifest.json``."""
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": FORMAT_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(directory: Path) -> dict:
    """Check every file the manifest lists against its sha256; raise :class:`EngineIntegrityError` naming the
    first that differs or is missing."""
    path = directory / MANIFEST
    if not path.is_file():
        raise EngineIntegrityError(f"{directory} has no {MANIFEST}: not an autodeploy engine directory")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EngineIntegrityError(f"{path} is not a valid manifest ({exc})") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise EngineIntegrityError(f"{path}: format {manifest.get('format')}, this autodeploy reads {FORMAT_VERSION}")
    for rel, digest in files.items():
        f = directory / rel
        if ".." in Path(rel).parts or not f.is_file():
            raise EngineIntegrityError(f"{directory}: file {rel} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise EngineIntegrityError(f"{directory}: {rel} does not match its sha256 in the manifest (corrupt?)")
    return manifest


def read_json(directory: Path, name: str) -> dict:
    return json.loads((directory / name).read_text())


def source_hash() -> str:
    """Hash of autodeploy's own sources (every package it installs): an engine built by other code is stale."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        for pkg in ("autodeploy", "autodeploy.passes", "autodeploy.backends", "autodeploy.models"):
            spec = importlib.util.find_spec(pkg)
            for root in (spec.submodule_search_locations or []) if spec else []:
                for f in sorted(Path(root).rglob("*.py")):
                    h.update(f.relative_to(root).as_posix().encode())
                    h.update(f.read_bytes())
        _SOURCE_HASH = h.hexdigest()[:16]
    return _SOURCE_HASH


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnxscript": onnxscript.__version__, "autodeploy_source": source_hash()}


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def graph_key(gm: fx.GraphModule, example: dict[str, torch.Tensor], extra: dict[str, Any]) -> str:
    """Key of an engine: the engine graph's code, every tensor it holds (shape, dtype, content: the weights are in
    the engine), the static shapes and dtypes of its inputs, ``extra`` (target, options) and library versions."""
    from autodeploy.graph.utils import getattr_path

    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = getattr_path(gm, node.target)
            if isinstance(t, torch.Tensor):
                tensors[node.target] = [list(t.shape), str(t.dtype), _tensor_digest(t)]
    inputs = {n: [list(t.shape[1:]) if n.startswith(("k_cache", "v_cache")) else t.dim(), str(t.dtype)]
              for n, t in example.items()}
    payload = {"format": FORMAT_VERSION, "code": gm.code, "tensors": tensors, "inputs": inputs, "extra": extra,
               "versions": library_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def default_cache_dir() -> Optional[Path]:
    """``$AUTODEPLOY_ENGINE_CACHE`` (``0`` or empty: off), else ``$AUTODEPLOY_CACHE_DIR/engines``, else
    ``~/.cache/autodeploy/engines``: an export (or a TensorRT build) is the slowest part of a compile."""
    env = os.environ.get("AUTODEPLOY_ENGINE_CACHE")
    if env is not None:
        return None if env in ("", "0") else Path(env)
    base = os.environ.get("AUTODEPLOY_CACHE_DIR")
    return Path(base) / "engines" if base else Path.home() / ".cache" / "autodeploy" / "engines"


def lookup(cache_dir: Optional[Path], key: str) -> Optional[Path]:
    """The verified cache entry for ``key``, or None (a corrupt entry is logged and ignored, then replaced)."""
    if cache_dir is None:
        return None
    entry = cache_dir / key
    if not entry.is_dir():
        return None
    try:
        verify_manifest(entry)
        return entry
    except EngineIntegrityError as exc:
        log.warning("engine cache entry unusable, rebuilding: %s", exc)
        return None


def store(cache_dir: Optional[Path], key: str, build) -> tuple[Path, bool]:
    """Build an entry with ``build(directory)`` and publish it atomically under ``key``. Without a cache dir the
    engine goes to a private temporary directory. Returns (entry, cached)."""
    if cache_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="autodeploy-engine-"))
        build(tmp)
        write_manifest(tmp)
        return tmp, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        build(tmp)
        write_manifest(tmp)
        entry = cache_dir / key
        if entry.exists():  # a corrupt entry (lookup refused it) or one a concurrent compile just wrote
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        return entry, True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_engine(src: Path, dst: Path, names: Iterable[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(src / name, dst / name)
