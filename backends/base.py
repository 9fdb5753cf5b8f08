"""The backend contract (docs/architecture.md, section "Backends").

A backend says what it can run (``available``/``supports``), which derived metadata fields it reads
(``metadata_fields``, all computed in the one ``prepare_metadata`` node), how its KV cache is laid out, and
which cached-attention op replaces the canonical one. Every cached-attention op shares one schema, defined
once in autodeploy/ops/cached.py (``define_cached_attention``)::

    op(q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D], <extra inputs>, k_cache, v_cache,
       cu_seqlens_q, seq_lens_kv, page_table, slot_mapping, batch_info, meta: Tensor[],
       scale, <every registered variant parameter by name>) -> out[T,Hq,D]

so the cache-insertion pass is generic and a plugin only brings its op. A backend lists the variant parameters
it runs in ``capabilities``; ``supports`` refuses a layer that needs any other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from autodeploy.ops import kv_quant


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a backend must know about one attention layer to say whether it can run it.

    ``params`` holds the layer's *active* variant parameters by name (autodeploy/ops/variants/): scalars by
    value, tensor parameters as ``True`` (their values live in the graph). A backend that does not declare one
    of them in ``capabilities`` refuses the layer."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    causal: bool
    dtype: torch.dtype
    params: tuple[tuple[str, Any], ...] = ()
    # How the layer's KV cache is stored (autodeploy/ops/kv_quant.py): "auto" (the model dtype) or "fp8".
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        items = self.params.items() if isinstance(self.params, dict) else self.params
        object.__setattr__(self, "params", tuple(sorted((str(k), v) for k, v in items)))

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.params).get(name, default)

    @property
    def sliding_window(self) -> Optional[int]:
        return self.param("sliding_window")

    @property
    def logit_softcap(self) -> Optional[float]:
        return self.param("logit_softcap")

    @property
    def has_sinks(self) -> bool:
        return bool(self.param("sinks"))

    def features(self) -> str:
        parts = [f"H={self.num_heads}/{self.num_kv_heads}", f"D={self.head_dim}"]
        parts += [name if value is True else f"{name}={value}" for name, value in self.params]
        if self.kv_cache_dtype != "auto":
            parts.append(f"kv={self.kv_cache_dtype}")
        return " ".join(parts)



@dataclass(frozen=True)
class StateSpec:
    """One stateful mixer layer's per-sequence state (autodeploy/ops/mixers/): the mixer kind, the shape of one
    sequence's state and its dtype. The runtime keeps one slot per live sequence (runtime/state_slots.py); the
    backend lays the slots out (``allocate_state``)."""

    layer: int
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def features(self) -> str:
        return f"{self.kind} state {list(self.shape)} {str(self.dtype).replace('torch.', '')}"


# The methods that define a cache layout (see ``AttentionBackend.effective_cache_layout_key``).
_LAYOUT_METHODS = ("cache_names", "allocate_cache", "copy_pages", "swap_out", "swap_in")


class CudaGraphSupport(enum.IntEnum):
    """How much of a step a backend's cached op lets a CUDA graph capture (higher includes lower).

    ``NONE``: never captured (e.g. the op sizes work from device data on the host). ``DECODE``: decode-only steps
    (fixed batch buckets). ``PIECEWISE``: also prefill/mixed steps, with the attention op run eager between
    captured token-wise pieces. ``WHOLE_STEP``: the op runs device-composed steps, so one graph per token bucket
    replays any mixed step (lowering/cudagraph.MixedGraphRunner)."""

    NONE = 0
    DECODE = 1
    PIECEWISE = 2
    WHOLE_STEP = 3


class AttentionBackend:
    """Base class; subclasses set the class attributes and override what differs.

    Cache layout: each attention layer has the cache tensors ``allocate_cache`` returns, named by
    ``cache_names`` (graph inputs ``<name>_<layer>``, e.g. ``k_cache_0``, ``v_cache_0``, and with an FP8 KV cache
    ``k_scale_0``, ``v_scale_0``), each with pages along dim 0. ``copy_pages``/``swap_out``/``swap_in`` and
    ``bytes_per_token`` work on those, so the runtime never assumes a layout. Host planning: ``plan_step`` runs
    once per step (only when a backend overrides it)."""

    name: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    metadata_fields: tuple[str, ...] = ()
    # Variant parameters (autodeploy/ops/variants/) the cached op runs; ``supports`` refuses any other.
    capabilities: frozenset[str] = frozenset()
    # KV-cache storage dtypes its cached op reads (kv_quant.KV_CACHE_DTYPES); ``supports`` refuses any other.
    kv_cache_dtypes: tuple[str, ...] = ("auto",)
    # Higher wins in automatic selection among backends that support the model.
    priority: int = 0
    # The cached op runs device-composed steps (``batch_info[0] == metadata.DEVICE_COMPOSED``): launches sized by
    # tensor shapes alone, prefill/decode split read on the device, padding tokens (slot -1) and empty sequences
    # ignored. Then one CUDA graph per token bucket serves every mixed step (cudagraph.MixedGraphRunner).
    device_composed_steps: bool = False
    # Graded CUDA-graph support; ``cuda_graph_support()`` is what lowering reads (``device_composed_steps`` implies
    # WHOLE_STEP, for backends written before the grade existed).
    cuda_graphs: CudaGraphSupport = CudaGraphSupport.PIECEWISE
    default_page_size: int = 16
    # One line for ``autodeploy backends``; a backend that overrides ``allocate_cache`` says its own layout.
    cache_layout: str = "paged K and V per layer, each [num_pages, page_size, kv_heads, head_dim]"
    # Names the physical cache layout (what ``cache_names``/``allocate_cache``/``copy_pages``/``swap_*`` produce
    # and the cached op reads). Backends with equal keys may run different layers of one model over caches the
    # model's primary backend allocates (per-layer fallback, ``can_share_cache``). The default is the contract's
    # paged layout (docs/contracts.md). A subclass that overrides a layout method without declaring its own key
    # gets none (``effective_cache_layout_key``): a private layout is never mixed with another backend's.
    cache_layout_key: Optional[str] = "paged_kv"

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        """Can this backend run on ``device`` with the installed packages? ``explicit``: the user asked for it."""
        if device.type not in self.devices:
            return False, f"runs on {self.devices}, not {device.type}"
        return True, "available"

    def supports(self, spec: AttentionSpec) -> tuple[bool, str]:
        """Dtype, causality, and every active variant parameter of the layer against ``capabilities``: a
        parameter the backend does not declare is refused by name, never silently ignored."""
        if spec.dtype not in self.dtypes:
            return False, f"dtype {spec.dtype} not supported"
        if not spec.causal:
            return False, "only causal attention has a paged cached form"
        missing = [name for name, _ in spec.params if name not in self.capabilities]
        if missing:
            return False, f"backend {self.name!r} lacks the capabilities {missing} (it runs {sorted(self.capabilities)})"
        if spec.kv_cache_dtype not in self.kv_cache_dtypes:
            return False, (f"backend {self.name!r} cannot store a {spec.kv_cache_dtype} KV cache "
                           f"(its kv_cache_dtypes: {list(self.kv_cache_dtypes)})")
        return True, "supported"

    def supports_page_size(self, page_size: int) -> tuple[bool, str]:
        """Can the cached op read pages of ``page_size`` tokens? The primary backend's page size applies to every
        layer of a model, so a per-layer fallback must accept it. The default takes any size."""
        return True, "any page size"

    # -- per-layer backends (a model may run some layers on a fallback backend; registry.select_backend) -------
    def layer_backend(self, spec: AttentionSpec) -> "AttentionBackend":
        """The backend that runs layer ``spec``: this one, except in a per-layer combination (backends/layered.py),
        whose layers each name their own. Cache insertion builds each layer's cached op from it."""
        return self

    def involved(self) -> tuple["AttentionBackend", ...]:
        """Every backend that runs some layer of the model, the primary first."""
        return (self,)

    def effective_cache_layout_key(self) -> Optional[str]:
        """``cache_layout_key``, unless a class below the one that declared it overrides a layout method (then
        the layout is its own, and None: never shared)."""
        if "cache_layout_key" in vars(self):
            return self.cache_layout_key
        mro = type(self).__mro__
        key_at = next(i for i, cls in enumerate(mro) if "cache_layout_key" in vars(cls))
        layout_at = min((i for i, cls in enumerate(mro) if any(m in vars(cls) for m in _LAYOUT_METHODS)),
                        default=len(mro))
        return None if layout_at < key_at else self.cache_layout_key

    def can_share_cache(self, other: "AttentionBackend") -> tuple[bool, str]:
        """May ``other``'s cached op run layers over caches this backend lays out? Only with one declared layout
        key on both sides; a backend that lowers the whole graph to an engine (``engine_lowering``) never mixes."""
        for b in (self, other):
            if getattr(b, "engine_lowering", None) is not None:
                return False, f"{b.name} lowers the whole graph to one engine (no per-layer mixing)"
        mine, theirs = self.effective_cache_layout_key(), other.effective_cache_layout_key()
        if mine is None or theirs is None:
            private = self if mine is None else other
            return False, f"{private.name} keeps its own cache layout (no cache_layout_key declared for it)"
        if mine != theirs:
            return False, f"cache layouts differ ({self.name}: {mine!r}, {other.name}: {theirs!r})"
        return True, f"shares the cache layout {mine!r}"

    def layer_metadata_fields(self, spec: AttentionSpec) -> tuple[str, ...]:
        """The derived fields one layer's cached op reads, in the order it receives them in ``meta``.
        Parameterised names (``"field:key=value"``) let layers that differ (e.g. in window) read their own."""
        return tuple(self.metadata_fields)

    def model_metadata_fields(self, specs: list[AttentionSpec]) -> tuple[str, ...]:
        """Union of the layers' fields: what the one ``prepare_metadata`` node derives."""
        return tuple(dict.fromkeys(f for spec in specs for f in self.layer_metadata_fields(spec)))

    def cached_attention_op(self) -> Any:
        raise NotImplementedError

    # -- cache layout -----------------------------------------------------------------------------------------
    def cache_names(self, spec: AttentionSpec) -> tuple[str, ...]:
        """Names of one layer's cache tensors, in ``allocate_cache`` order: the cached op's inputs of those names
        receive them (graph inputs ``<name>_<layer>``). An FP8 KV cache adds its scales (cached.KV_SCALE_CACHES)."""
        if spec.kv_cache_dtype == "fp8":
            return ("k_cache", "v_cache", "k_scale", "v_scale")
        return ("k_cache", "v_cache")

    def allocate_cache(self, num_pages: int, page_size: int, spec: AttentionSpec, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, ...]:
        """One layer's cache tensors (named by ``cache_names``), pages along dim 0. The default is
        docs/contracts.md's paged layout ``[num_pages, page_size, Hkv, D]`` for K and V; with
        ``spec.kv_cache_dtype == "fp8"`` the pages are float8 E4M3 and ``[num_pages, page_size, Hkv]`` bf16
        scales follow (autodeploy/ops/kv_quant.py)."""
        shape = (num_pages, page_size, spec.num_kv_heads, spec.head_dim)
        v_shape = (num_pages, page_size, spec.num_kv_heads, spec.v_head_dim)
        if spec.kv_cache_dtype == "fp8":
            scale_shape = (num_pages, page_size, spec.num_kv_heads)
            fp8, sdt = kv_quant.FP8_KV_DTYPE, kv_quant.KV_SCALE_DTYPE
            return (torch.zeros(shape, dtype=fp8, device=device), torch.zeros(v_shape, dtype=fp8, device=device),
                    torch.ones(scale_shape, dtype=sdt, device=device), torch.ones(scale_shape, dtype=sdt, device=device))
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(v_shape, dtype=dtype, device=device)

    def bytes_per_token(self, spec: AttentionSpec, dtype: torch.dtype) -> int:
        """Cache bytes one token costs in this layer, for sizing the cache from memory. Derived from
        ``allocate_cache`` on the meta device, so an overridden layout is sized right without more code."""
        page = 64
        tensors = self.allocate_cache(1, page, spec, dtype, torch.device("meta"))
        return -(-sum(t.numel() * t.element_size() for t in tensors) // page)

    def copy_pages(self, caches: Sequence[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy pages ``src[i] -> dst[i]`` (device index tensors) in one layer's caches: copy-on-write for
        prefix sharing (runtime/kv_cache.py)."""
        for cache in caches:
            cache[dst] = cache[src]

    def swap_out(self, caches: Sequence[torch.Tensor], pages: torch.Tensor) -> list[torch.Tensor]:
        """Host copies of ``pages`` of one layer's caches (to preempt a sequence without losing its KV)."""
        pin = any(c.is_cuda for c in caches) and torch.cuda.is_available()
        out = []
        for cache in caches:
            host = torch.empty((pages.numel(), *cache.shape[1:]), dtype=cache.dtype, pin_memory=pin)
            host.copy_(cache[pages.to(cache.device)])
            out.append(host)
        return out

    def swap_in(self, caches: Sequence[torch.Tensor], pages: torch.Tensor, saved: Sequence[torch.Tensor]) -> None:
        """Write ``swap_out``'s copies back into ``pages`` (which may differ from the pages swapped out)."""
        if len(saved) != len(caches):
            raise ValueError(f"swap_in got {len(saved)} saved tensors for {len(caches)} caches")
        for cache, host in zip(caches, saved):
            cache[pages.to(cache.device)] = host.to(cache.device, non_blocking=True)

    # -- recurrent state slots (stateful mixers, autodeploy/ops/mixers/) --------------------------------------
    def allocate_state(self, num_slots: int, spec: StateSpec, device: torch.device) -> torch.Tensor:
        """One stateful layer's state tensor (its graph input ``<kind>_state_<layer>``): ``num_slots`` slots
        along dim 0, each ``spec.shape``. The cached mixer op reads a slot only when the sequence continues
        (tokens before the chunk), so a reused slot needs no reset before use."""
        return torch.zeros((num_slots, *spec.shape), dtype=spec.dtype, device=device)

    def state_bytes_per_slot(self, spec: StateSpec) -> int:
        """Bytes one sequence's slot costs in this layer (from ``allocate_state`` on the meta device)."""
        t = self.allocate_state(1, spec, torch.device("meta"))
        return t.numel() * t.element_size()

    def copy_state(self, state: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots ``src[i] -> dst[i]`` (device index tensors) in one layer's state (e.g. to fork a sequence)."""
        state[dst] = state[src]

    def reset_state(self, state: torch.Tensor, slots: torch.Tensor) -> None:
        """Zero ``slots`` in one layer's state."""
        state[slots] = 0

    def cached_mixer_op(self, kind: str) -> Any:
        """The cached op this backend runs for mixer ``kind`` (default: the torch reference the kind registers,
        with its one schema; a backend may return its own kernel with the same schema)."""
        from autodeploy.ops.mixers import MIXER_KINDS

        return MIXER_KINDS[kind].cached

    # -- per-step host planning -------------------------------------------------------------------------------
    def plan_step(self, batch: Any, chunks: Sequence[Any]) -> None:
        """Host-side planner run once per step, after packing and before the forward (as vLLM's metadata
        builders and FlashInfer's ``plan()``): ``batch`` is the packed ``StepBatch``, ``chunks`` the scheduled
        ``SequenceChunk`` list (``batch.order`` maps packed rows to it; CUDA-graph padding rows come after).
        It runs for every packed step: engine steps, warm-up, and the dummy steps graph captures run on. Only
        called when a subclass overrides it (no cost otherwise). For CUDA-graph replay, anything it hands the
        device must be written in place into buffers allocated once. The base does nothing."""

    def has_plan_step(self) -> bool:
        return type(self).plan_step is not AttentionBackend.plan_step

    # -- passes and lowering -----------------------------------------------------------------------------------
    def cuda_graph_support(self) -> CudaGraphSupport:
        return CudaGraphSupport.WHOLE_STEP if self.device_composed_steps else CudaGraphSupport(self.cuda_graphs)

    def graph_passes(self) -> list[Callable[[fx.GraphModule, Any], Any]]:
        """Rewrites tied to this backend's attention op, run after cache insertion when it runs some layer (e.g.
        folding RoPE into its cache write); each must touch only its own layers' cached ops."""
        return []

    def model_passes(self) -> list[Callable[[fx.GraphModule, Any], Any]]:
        """Kernel fusions that do not involve the attention op: run whenever this backend is ``available`` on
        the device, whichever backend runs attention (registry.kernel_passes)."""
        return []

    def describe(self) -> dict[str, Any]:
        """What ``autodeploy backends`` lists: a plain-data summary of the contract."""
        return {
            "devices": list(self.devices), "dtypes": [str(d).replace("torch.", "") for d in self.dtypes],
            "params": sorted(getattr(self, "capabilities", ())),
            "kv_cache_dtypes": list(getattr(self, "kv_cache_dtypes", ("auto",))),
            "metadata_fields": list(self.metadata_fields), "cuda_graphs": self.cuda_graph_support().name.lower(),
            "cache_layout": self.cache_layout, "cache_layout_key": self.effective_cache_layout_key(),
            "default_page_size": self.default_page_size,
            "priority": self.priority, "host_planner": self.has_plan_step(), "module": type(self).__module__,
            "graph_passes": [getattr(f, "pass_name", f.__name__) for f in self.graph_passes()],
            "model_passes": [getattr(f, "pass_name", f.__name__) for f in self.model_passes()],
        }
