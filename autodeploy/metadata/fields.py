"""Device side of the metadata contract: the derived fields, all computed in the ONE ``prepare_metadata`` node.

Derivations are registered by name in :data:`METADATA_FIELDS`; backends declare the names they read and may
register their own. All of them run inside that one node, once per forward, whatever the number of layers or
backends.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

MetadataDerivation = Callable[..., Tensor]
METADATA_FIELDS: dict[str, MetadataDerivation] = {}


def register_metadata_field(name: str) -> Callable[[MetadataDerivation], MetadataDerivation]:
    """Register a derivation. It receives the base inputs (and fields derived before it) and must use
    shape-static torch ops only, so it also runs on fake tensors and inside CUDA graphs.

    A field may be parameterised: ``"name:key=1;other=2"`` calls the derivation with ``key=1, other=2``
    (integer values). Layers whose fields have equal parameters share one tensor."""

    def deco(fn: MetadataDerivation) -> MetadataDerivation:
        if name in METADATA_FIELDS and METADATA_FIELDS[name] is not fn:
            raise ValueError(f"metadata field {name!r} is already registered")
        METADATA_FIELDS[name] = fn
        return fn

    return deco


@register_metadata_field("seq_idx")
def _seq_idx(m: dict[str, Tensor]) -> Tensor:
    """Sequence each token belongs to."""
    n_tok = m["position_ids"].shape[-1]
    tok = torch.arange(n_tok, device=m["cu_seqlens_q"].device, dtype=torch.int32)
    return torch.searchsorted(m["cu_seqlens_q"][1:], tok, right=True).to(torch.int32)


@register_metadata_field("q_lens")
def _q_lens(m: dict[str, Tensor]) -> Tensor:
    cu = m["cu_seqlens_q"]
    return cu[1:] - cu[:-1]


@register_metadata_field("tok_offset")
def _tok_offset(m: dict[str, Tensor]) -> Tensor:
    """Index of each token inside its sequence's chunk."""
    seq_idx = _derive(m, "seq_idx")
    n_tok = seq_idx.shape[0]
    tok = torch.arange(n_tok, device=seq_idx.device, dtype=torch.int32)
    return tok - m["cu_seqlens_q"][seq_idx.long()]


@register_metadata_field("q_abs_pos")
def _q_abs_pos(m: dict[str, Tensor]) -> Tensor:
    """Absolute position of each query token: kv_len - q_len + offset."""
    seq_idx = _derive(m, "seq_idx").long()
    return m["seq_lens_kv"][seq_idx] - _derive(m, "q_lens")[seq_idx] + _derive(m, "tok_offset")


def split_field(name: str) -> tuple[str, dict[str, int]]:
    """``"name:a=1;b=2"`` -> ``("name", {"a": 1, "b": 2})``."""
    base, _, params = name.partition(":")
    kwargs = {}
    for item in filter(None, params.split(";")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"metadata field {name!r}: parameter {item!r} is not key=value")
        kwargs[key.strip()] = int(value)
    return base, kwargs


def _derive(m: dict[str, Tensor], name: str) -> Tensor:
    """Compute a field once and memoise it inside this forward's metadata dict."""
    if name not in m:
        base, kwargs = split_field(name)
        m[name] = METADATA_FIELDS[base](m, **kwargs)
    return m[name]


def derive_fields(base: dict[str, Tensor], fields: Sequence[str]) -> list[Tensor]:
    m = dict(base)
    for name in fields:
        if split_field(name)[0] not in METADATA_FIELDS:
            raise KeyError(f"unknown metadata field {name!r}; registered: {sorted(METADATA_FIELDS)}")
    return [_derive(m, name) for name in fields]


@torch.library.custom_op("autodeploy::prepare_metadata", mutates_args=())
def prepare_metadata(
    position_ids: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens_kv: Tensor,
    page_table: Tensor,
    batch_info: Tensor,
    fields: str,
) -> list[Tensor]:
    """The ONE metadata node of a cached graph: derives every requested field once per forward.

    ``fields`` is a comma-separated list of names from :data:`METADATA_FIELDS` (torch.library schemas
    have no list-of-strings type).
    """
    base = dict(position_ids=position_ids, cu_seqlens_q=cu_seqlens_q, seq_lens_kv=seq_lens_kv,
                page_table=page_table, batch_info=batch_info)
    # Outputs must not alias inputs (custom-op rule); derivations always produce fresh tensors.
    return [t.clone() if any(t is b for b in base.values()) else t for t in derive_fields(base, fields.split(","))]


@prepare_metadata.register_fake
def _prepare_metadata_fake(position_ids, cu_seqlens_q, seq_lens_kv, page_table, batch_info, fields):
    base = dict(position_ids=position_ids, cu_seqlens_q=cu_seqlens_q, seq_lens_kv=seq_lens_kv,
                page_table=page_table, batch_info=batch_info)
    return [torch.empty_like(t) for t in derive_fields(base, fields.split(","))]
