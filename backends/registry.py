"""Backend registry and per-model selection policy.

Built-in backends register on import; third-party plugins through the ``autodeploy.backends`` entry-point
group (each entry point is a callable returning an :class:`AttentionBackend`, or the class itself). A plugin
that fails to import or does not give a backend is skipped with a warning naming it; the core keeps working.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, Callable, Optional, Sequence

import torch

from autodeploy.backends.base import AttentionBackend, AttentionSpec
from autodeploy.errors import BackendUnavailableError, UnsupportedModelError

log = logging.getLogger(__name__)

_BACKENDS: dict[str, AttentionBackend] = {}
_BUILTINS = ("autodeploy.backends.torch", "autodeploy.backends.triton", "autodeploy.backends.onnxruntime",
             "autodeploy.backends.tensorrt")
_loaded = False


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    if not backend.name:
        raise ValueError("a backend needs a name")
    _BACKENDS[backend.name] = backend
    return backend


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTINS:
        importlib.import_module(mod)
    for ep in entry_points(group="autodeploy.backends"):
        try:
            obj = ep.load()
            backend = obj() if callable(obj) else obj
            if not isinstance(backend, AttentionBackend):
                raise TypeError(f"{ep.value} gives a {type(backend).__name__}, not an AttentionBackend")
            register_backend(backend)
        except Exception as exc:  # a broken plugin must not break the core
            log.warning("backend plugin %s (%s) failed to load: %s: %s", ep.name, ep.value, type(exc).__name__, exc)


def kernel_passes(device: torch.device, attention_backend: AttentionBackend,
                  requested: Optional[Sequence[str]] | str = "auto") -> tuple[list[Callable[..., Any]], list[str]]:
    """The model-level kernel fusions (``AttentionBackend.model_passes``) to run, and why each provider was
    used or skipped. ``requested``: ``"auto"`` (every backend available on ``device``, the attention backend
    counting as asked for), or the provider names to use (asked for explicitly; an unavailable one is an
    error), or ``()`` for none. Passes of several providers run in priority order, each name once."""
    _load()
    if requested == "auto":
        names = [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]
    else:
        names = list(requested or ())
    passes: list[Callable[..., Any]] = []
    notes: list[str] = []
    seen: set[str] = set()
    engine = getattr(attention_backend, "engine_lowering", None)
    for name in names:
        backend = get_backend(name)
        offered = backend.model_passes()
        if not offered:
            continue
        if engine and requested == "auto" and backend is not attention_backend:
            # the whole graph becomes one engine, whose exporter translates canonical ops only
            notes.append(f"kernels from {name} skipped: {attention_backend.name} lowers the whole graph to an engine")
            continue
        explicit = requested != "auto" or backend is attention_backend
        ok, why = backend.available(device, explicit)
        if not ok:
            if requested != "auto":
                raise BackendUnavailableError(f"kernel provider {name!r} cannot run here: {why}")
            notes.append(f"kernels from {name} skipped: {why}")
            continue
        new = [fn for fn in offered if getattr(fn, "pass_name", fn.__name__) not in seen]
        seen.update(getattr(fn, "pass_name", fn.__name__) for fn in new)
        passes += new
        notes.append(f"kernels from {name}: {', '.join(getattr(f, 'pass_name', f.__name__) for f in new)}")
    return passes, notes


def list_backends() -> list[str]:
    _load()
    return sorted(_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    _load()
    if name not in _BACKENDS:
        raise BackendUnavailableError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def select_backend(
    specs: Sequence[AttentionSpec], device: torch.device, requested: Optional[str] = "auto"
) -> tuple[AttentionBackend, str, dict[str, str]]:
    """Pick one backend for the whole model. Returns (backend, reason, {rejected name: why})."""
    _load()
    rejected: dict[str, str] = {}

    def check(backend: AttentionBackend, explicit: bool) -> Optional[str]:
        ok, why = backend.available(device, explicit)
        if not ok:
            return why
        for spec in specs:
            ok, why = backend.supports(spec)
            if not ok:
                return f"layer {spec.layer} ({spec.features()}): {why}"
        return None

    if requested and requested != "auto":
        backend = get_backend(requested)
        ok, why = backend.available(device, True)
        if not ok:  # a missing package or device, not a property of the model
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {why}")
        why = check(backend, explicit=True)
        if why is not None:
            raise UnsupportedModelError(f"backend {requested!r} cannot run this model: {why}")
        return backend, "requested by the user", rejected

    for backend in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        why = check(backend, explicit=False)
        if why is None:
            reason = f"highest-priority backend that supports all {len(specs)} attention layers on {device.type}"
            return backend, reason, rejected
        rejected[backend.name] = why
    raise UnsupportedModelError(f"no attention backend supports this model: {rejected}")
