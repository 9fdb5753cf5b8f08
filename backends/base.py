"""The backend contract (docs/architecture.md, section "Backends").

A backend says what it can run (``available``/``supports``), which derived metadata fields it reads
(``metadata_fields``, all computed in the one ``prepare_metadata`` node), how its KV cache is laid out, and
which cached-attention op replaces the canonical one. Every cached-attention op shares one schema::

    op(q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D], k_cache, v_cache,
       cu_seqlens_q, seq_lens_kv, page_table, slot_mapping, batch_info, meta: Tensor[],
       scale, sliding_window, logit_softcap, sinks) -> out[T,Hq,D]

so the cache-insertion pass is generic and a plugin only brings its op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import fx


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a backend must know about one attention layer to say whether it can run it."""

    layer: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    causal: bool
    sliding_window: Optional[int]
    logit_softcap: Optional[float]
    has_sinks: bool
    dtype: torch.dtype

    def features(self) -> str:
        parts = [f"H={self.num_heads}/{self.num_kv_heads}", f"D={self.head_dim}"]
        if self.sliding_window:
            parts.append(f"window={self.sliding_window}")
        if self.logit_softcap:
            parts.append(f"softcap={self.logit_softcap}")
        if self.has_sinks:
            parts.append("sinks")
        return " ".join(parts)


class AttentionBackend:
    """Base class; subclasses set the class attributes and override what differs."""

    name: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    metadata_fields: tuple[str, ...] = ()
    # Higher wins in automatic selection among backends that support the model.
    priority: int = 0
    # The cached op runs device-composed steps (``batch_info[0] == metadata.DEVICE_COMPOSED``): launches sized by
    # tensor shapes alone, prefill/decode split read on the device, padding tokens (slot -1) and empty sequences
    # ignored. Then one CUDA graph per token bucket serves every mixed step (cudagraph.MixedGraphRunner).
    device_composed_steps: bool = False
    default_page_size: int = 16

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        """Can this backend run on ``device`` with the installed packages? ``explicit``: the user asked for it."""
        if device.type not in self.devices:
            return False, f"runs on {self.devices}, not {device.type}"
        return True, "available"

    def supports(self, spec: AttentionSpec) -> tuple[bool, str]:
        if spec.dtype not in self.dtypes:
            return False, f"dtype {spec.dtype} not supported"
        if not spec.causal:
            return False, "only causal attention has a paged cached form"
        return True, "supported"

    def layer_metadata_fields(self, spec: AttentionSpec) -> tuple[str, ...]:
        """The derived fields one layer's cached op reads, in the order it receives them in ``meta``.
        Parameterised names (``"field:key=value"``) let layers that differ (e.g. in window) read their own."""
        return tuple(self.metadata_fields)

    def model_metadata_fields(self, specs: list[AttentionSpec]) -> tuple[str, ...]:
        """Union of the layers' fields: what the one ``prepare_metadata`` node derives."""
        return tuple(dict.fromkeys(f for spec in specs for f in self.layer_metadata_fields(spec)))

    def cached_attention_op(self) -> Any:
        raise NotImplementedError

    def allocate_cache(self, num_pages: int, page_size: int, spec: AttentionSpec, dtype: torch.dtype,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (num_pages, page_size, spec.num_kv_heads, spec.head_dim)
        v_shape = (num_pages, page_size, spec.num_kv_heads, spec.v_head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(v_shape, dtype=dtype, device=device)

    def graph_passes(self) -> list[Callable[[fx.GraphModule, Any], Any]]:
        """Backend-specific rewrites to run after cache insertion (e.g. kernel fusions)."""
        return []
