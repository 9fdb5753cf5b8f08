"""Per-layer attention backends: a primary backend, and for the layers it cannot run, fallbacks that share its
cache layout (registry.select_backend picks them; docs/architecture.md, "Per-layer fallback").

:class:`LayeredBackend` is what the compiler and runtime see as the model's attention backend when layers
differ. It answers per layer where the contract is per layer (``layer_backend``, ``supports``, metadata fields)
and for the model where it is per model: the cache layout, page size and state slots are the primary's (the
fallbacks declared that they read it, ``AttentionBackend.can_share_cache``); the CUDA-graph grade is the
weakest of the backends involved; every involved backend's host planner runs once per step; every involved
backend's graph passes run (each touching only its own layers' cached ops).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx

from autodeploy.backends.base import AttentionBackend, AttentionSpec, CudaGraphSupport, StateSpec


class LayeredBackend(AttentionBackend):
    """Attention backends chosen per layer over ONE cache layout, the primary's.

    ``name`` is the primary's (a compile-cache entry records it, and the primary owns the layout); ``label``
    names all of them (``"triton+torch"``) for messages."""

    def __init__(self, primary: AttentionBackend, layers: Sequence[AttentionBackend]):
        if not layers:
            raise ValueError("a layered backend needs at least one layer")
        self.primary = primary
        self.layers = tuple(layers)  # index: AttentionSpec.layer
        self._involved = tuple(dict.fromkeys((primary, *self.layers)))
        for other in self._involved[1:]:
            ok, why = primary.can_share_cache(other)
            if not ok:
                raise ValueError(f"{other.name} cannot run layers of a {primary.name} model: {why}")
        self.name = primary.name
        self.label = "+".join(b.name for b in self._involved)
        self.devices = primary.devices
        self.dtypes = primary.dtypes
        self.priority = primary.priority
        self.default_page_size = primary.default_page_size
        self.cache_layout = primary.cache_layout
        self.cache_layout_key = primary.effective_cache_layout_key()
        self.kv_cache_dtypes = primary.kv_cache_dtypes
        self.capabilities = frozenset().union(*(b.capabilities for b in self._involved))
        self.metadata_fields = tuple(dict.fromkeys(f for b in self._involved for f in b.metadata_fields))
        self.cuda_graphs = min(b.cuda_graph_support() for b in self._involved)
        self.device_composed_steps = self.cuda_graphs == CudaGraphSupport.WHOLE_STEP

    # -- per layer ---------------------------------------------------------------------------------------------
    def layer_backend(self, spec: AttentionSpec) -> AttentionBackend:
        if not 0 <= spec.layer < len(self.layers):
            raise IndexError(f"layer {spec.layer} is not one of the {len(self.layers)} attention layers")
        return self.layers[spec.layer]

    def involved(self) -> tuple[AttentionBackend, ...]:
        return self._involved

    def fallback_layers(self) -> dict[str, list[int]]:
        """{backend name: the layers it runs} for every backend but the primary."""
        out: dict[str, list[int]] = {}
        for i, b in enumerate(self.layers):
            if b is not self.primary:
                out.setdefault(b.name, []).append(i)
        return out

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        for b in self._involved:
            ok, why = b.available(device, explicit and b is self.primary)
            if not ok:
                return False, f"{b.name}: {why}"
        return True, "available"

    def supports(self, spec: AttentionSpec) -> tuple[bool, str]:
        return self.layer_backend(spec).supports(spec)

    def supports_page_size(self, page_size: int) -> tuple[bool, str]:
        for b in self._involved:
            ok, why = b.supports_page_size(page_size)
            if not ok:
                return False, f"{b.name}: {why}"
        return True, "accepted by every backend involved"

    def layer_metadata_fields(self, spec: AttentionSpec) -> tuple[str, ...]:
        return self.layer_backend(spec).layer_metadata_fields(spec)

    def cached_attention_op(self) -> Any:
        raise TypeError(f"layers of this model run different cached ops ({self.label}): ask layer_backend(spec)")

    # -- the model's: cache layout and state slots are the primary's -------------------------------------------
    def cache_names(self, spec: AttentionSpec) -> tuple[str, ...]:
        return self.primary.cache_names(spec)

    def allocate_cache(self, num_pages: int, page_size: int, spec: AttentionSpec, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, ...]:
        return self.primary.allocate_cache(num_pages, page_size, spec, dtype, device)

    def bytes_per_token(self, spec: AttentionSpec, dtype: torch.dtype) -> int:
        return self.primary.bytes_per_token(spec, dtype)

    def copy_pages(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        self.primary.copy_pages(caches, src, dst)

    def swap_out(self, caches: Sequence[torch.Tensor], pages: torch.Tensor) -> list[torch.Tensor]:
        return self.primary.swap_out(caches, pages)

    def swap_in(self, caches: Sequence[torch.Tensor], pages: torch.Tensor, saved: Sequence[torch.Tensor]) -> None:
        self.primary.swap_in(caches, pages, saved)

    def allocate_state(self, num_slots: int, spec: StateSpec, device: torch.device) -> torch.Tensor:
        return self.primary.allocate_state(num_slots, spec, device)

    def state_bytes_per_slot(self, spec: StateSpec) -> int:
        return self.primary.state_bytes_per_slot(spec)

    def copy_state(self, state: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.primary.copy_state(state, src, dst)

    def reset_state(self, state: torch.Tensor, slots: torch.Tensor) -> None:
        self.primary.reset_state(state, slots)

    def cached_mixer_op(self, kind: str) -> Any:
        return self.primary.cached_mixer_op(kind)

    # -- per step, passes, lowering ----------------------------------------------------------------------------
    def plan_step(self, batch: Any, chunks: Sequence[Any]) -> None:
        """Every involved backend's host planner, once each per step."""
        for b in self._involved:
            if b.has_plan_step():
                b.plan_step(batch, chunks)

    def has_plan_step(self) -> bool:
        return any(b.has_plan_step() for b in self._involved)

    def cuda_graph_support(self) -> CudaGraphSupport:
        """The weakest grade of the backends involved: one graph replays every layer."""
        return CudaGraphSupport(self.cuda_graphs)

    def graph_passes(self) -> list[Callable[[fx.GraphModule, Any], Any]]:
        """Every involved backend's own rewrites, each name once, the primary's first."""
        out: list[Callable[[fx.GraphModule, Any], Any]] = []
        seen: set[str] = set()
        for b in self._involved:
            for fn in b.graph_passes():
                name = getattr(fn, "pass_name", fn.__name__)
                if name not in seen:
                    seen.add(name)
                    out.append(fn)
        return out

    def model_passes(self) -> list[Callable[[fx.GraphModule, Any], Any]]:
        return self.primary.model_passes()

    def grade_note(self) -> str:
        """What ``explain()`` says about the CUDA-graph grade of the combination."""
        grades = ", ".join(f"{b.name}: {b.cuda_graph_support().name.lower()}" for b in self._involved)
        return (f"CUDA-graph grade {self.cuda_graph_support().name.lower()}, the weakest of the backends "
                f"involved ({grades}); device-composed steps {'on' if self.device_composed_steps else 'off'}")

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(label=self.label, primary=self.primary.name, fallback_layers=self.fallback_layers(),
                    module=type(self.primary).__module__)
        return info
