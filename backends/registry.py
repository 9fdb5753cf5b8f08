"""Backend registry and per-model selection policy.

Built-in backends register on import; third-party plugins through the ``autodeploy.backends`` entry-point
group (each entry point is a callable returning an :class:`AttentionBackend`, or the class itself).
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Optional, Sequence

import torch

from autodeploy.backends.base import AttentionBackend, AttentionSpec
from autodeploy.errors import BackendUnavailableError, UnsupportedModelError

log = logging.getLogger(__name__)

_BACKENDS: dict[str, AttentionBackend] = {}
_BUILTINS = ("autodeploy.backends.torch", "autodeploy.backends.triton")
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
            register_backend(obj() if callable(obj) else obj)
        except Exception as exc:  # a broken plugin must not break the core
            log.warning("backend plugin %s failed to load: %s", ep.name, exc)


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
