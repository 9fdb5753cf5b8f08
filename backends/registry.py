"""Backend registry and per-model selection policy.

Built-in backends register on import; third-party plugins through the ``autodeploy.backends`` entry-point
group (each entry point is a callable returning an :class:`AttentionBackend`, or the class itself). A plugin
that fails to import or does not give a backend is skipped with a warning naming it; the core keeps working.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Optional, Sequence

import torch

from autodeploy.backends.base import AttentionBackend, AttentionSpec
from autodeploy.backends.layered import LayeredBackend
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
    running = {b.name for b in attention_backend.involved()}  # backends that run attention layers
    for name in names:
        backend = get_backend(name)
        offered = backend.model_passes()
        if not offered:
            continue
        if engine and requested == "auto" and name not in running:
            # the whole graph becomes one engine, whose exporter translates canonical ops only
            notes.append(f"kernels from {name} skipped: {attention_backend.name} lowers the whole graph to an engine")
            continue
        explicit = requested != "auto" or name in running
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


@dataclass(frozen=True)
class LayerFallback:
    """Layers the primary backend cannot run, and the backend that runs them instead."""

    layers: tuple[int, ...]
    backend: str
    reason: str  # why the primary refused them

    def describe(self) -> str:
        which = "layer" if len(self.layers) == 1 else "layers"
        return f"{which} {','.join(map(str, self.layers))} -> {self.backend}: {self.reason}"


@dataclass(frozen=True)
class BackendSelection:
    """What ``select_backend`` chose: ``backend`` is what the model runs (the primary itself, or a
    :class:`LayeredBackend` when some layers fall back), with the reasons ``explain()`` shows."""

    backend: AttentionBackend
    primary: AttentionBackend
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)
    fallbacks: tuple[LayerFallback, ...] = ()

    def notes(self) -> list[str]:
        """One line per fallback group, then the grade the combination gets."""
        lines = [f.describe() for f in self.fallbacks]
        if isinstance(self.backend, LayeredBackend):
            lines.append(self.backend.grade_note())
        return lines


def _by_priority() -> list[AttentionBackend]:
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def _why_not_fallback(primary: AttentionBackend, cand: AttentionBackend, spec: AttentionSpec,
                      device: torch.device, page_size: int) -> Optional[str]:
    """Why ``cand`` may not run layer ``spec`` of a model whose primary is ``primary`` (None: it may). It must be
    available on ``device`` by the automatic rules (nobody asked for it), share the primary's cache layout and
    this layer's cache tensor names, read the primary's page size, and support the layer."""
    ok, why = cand.available(device, False)
    if ok:
        ok, why = primary.can_share_cache(cand)
    if ok and cand.cache_names(spec) != primary.cache_names(spec):
        ok, why = False, (f"its cache tensors {list(cand.cache_names(spec))} differ from "
                          f"{list(primary.cache_names(spec))}")
    if ok:
        ok, why = cand.supports_page_size(page_size)
    if ok:
        ok, why = cand.supports(spec)
    return None if ok else why


def _fallback_for(primary: AttentionBackend, spec: AttentionSpec, device: torch.device,
                  page_size: int) -> tuple[Optional[AttentionBackend], list[str]]:
    """The highest-priority backend other than ``primary`` that may run layer ``spec``; else None, and why each
    candidate may not."""
    why_not: list[str] = []
    for cand in _by_priority():
        if cand is primary:
            continue
        why = _why_not_fallback(primary, cand, spec, device, page_size)
        if why is None:
            return cand, why_not
        why_not.append(f"{cand.name}: {why}")
    return None, why_not


def _plan(primary: AttentionBackend, specs: Sequence[AttentionSpec], device: torch.device, page_size: int,
          fallback: bool) -> tuple[Optional[list[AttentionBackend]], list[LayerFallback], Optional[str]]:
    """Each layer's backend with ``primary`` (available already) as the model's backend, or why it cannot be."""
    ok, why = primary.supports_page_size(page_size)
    if not ok:
        return None, [], f"page size {page_size}: {why}"
    refused = {}
    for spec in specs:
        ok, why = primary.supports(spec)
        if not ok:
            refused[spec.layer] = (spec, why)
    if not refused:
        return [primary] * len(specs), [], None
    if len(refused) == len(specs):
        spec, why = next(iter(refused.values()))
        return None, [], (f"it runs none of the {len(specs)} attention layers "
                          f"(layer {spec.layer} ({spec.features()}): {why})")
    if not fallback:
        spec, why = next(iter(refused.values()))
        return None, [], (f"layer {spec.layer} ({spec.features()}): {why}; per-layer fallback is off "
                          f"(backend_fallback=False)")
    chosen = {spec.layer: primary for spec in specs}
    groups: dict[tuple[str, str], list[int]] = {}
    for layer, (spec, why) in refused.items():
        other, why_not = _fallback_for(primary, spec, device, page_size)
        if other is None:
            detail = "; ".join(why_not) or "no other backend is registered"
            return None, [], (f"layer {layer} ({spec.features()}): {why}; and no backend that shares its cache "
                              f"layout can run it ({detail})")
        chosen[layer] = other
        groups.setdefault((other.name, why), []).append(layer)
    fallbacks = [LayerFallback(tuple(layers), name, why) for (name, why), layers in groups.items()]
    return [chosen[spec.layer] for spec in specs], fallbacks, None


def select_backend(
    specs: Sequence[AttentionSpec], device: torch.device, requested: Optional[str] = "auto", *,
    fallback: bool = True, page_size: Optional[int] = None,
) -> BackendSelection:
    """Pick the model's attention backend, per layer where needed.

    The primary is ``requested``, or with ``"auto"`` the highest-priority available backend that can serve as
    one. Layers it cannot run fall back, each to the highest-priority available backend that supports the layer,
    shares the primary's cache layout (``AttentionBackend.can_share_cache``) and takes the primary's page size
    (``page_size``, default the primary's ``default_page_size``). ``fallback=False`` allows no mixing: a requested
    backend must run every layer, ``auto`` picks one that does. A layer nothing compatible runs is refused,
    naming the layer, the primary and the reason."""
    _load()
    rejected: dict[str, str] = {}

    def combine(primary: AttentionBackend, layers: list[AttentionBackend]) -> AttentionBackend:
        return primary if all(b is primary for b in layers) else LayeredBackend(primary, layers)

    if requested and requested != "auto":
        primary = get_backend(requested)
        ok, why = primary.available(device, True)
        if not ok:  # a missing package or device, not a property of the model
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {why}")
        layers, fallbacks, why = _plan(primary, specs, device, page_size or primary.default_page_size, fallback)
        if layers is None:
            raise UnsupportedModelError(f"backend {requested!r} cannot run this model: {why}")
        reason = "requested by the user"
        if fallbacks:
            n = sum(len(f.layers) for f in fallbacks)
            reason += f"; {n} of {len(specs)} attention layers fall back to {sorted({f.backend for f in fallbacks})}"
            log.warning("backend %r was requested, but %s", requested, "; ".join(f.describe() for f in fallbacks))
        return BackendSelection(combine(primary, layers), primary, reason, rejected, tuple(fallbacks))

    for primary in _by_priority():
        ok, why = primary.available(device, False)
        if not ok:
            rejected[primary.name] = why
            continue
        layers, fallbacks, why = _plan(primary, specs, device, page_size or primary.default_page_size, fallback)
        if layers is None:
            rejected[primary.name] = why
            continue
        if fallbacks:
            n = sum(len(f.layers) for f in fallbacks)
            reason = (f"highest-priority backend on {device.type} that runs {len(specs) - n} of {len(specs)} "
                      f"attention layers; the others fall back per layer")
        else:
            reason = f"highest-priority backend that supports all {len(specs)} attention layers on {device.type}"
        return BackendSelection(combine(primary, layers), primary, reason, rejected, tuple(fallbacks))
    raise UnsupportedModelError(f"no attention backend supports this model: {rejected}")
