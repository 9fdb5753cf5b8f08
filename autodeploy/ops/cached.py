"""The one schema of every cached-attention op, and the helpers that define, call and read such ops by name.

    op(q[T,Hq,D], k[T,Hkv,D], v[T,Hkv,D], <extra inputs>, k_cache!, v_cache!,
       cu_seqlens_q, seq_lens_kv, page_table, slot_mapping, batch_info, meta: Tensor[], <optional caches>!?,
       scale, <every registered variant parameter, by name, default None>) -> out[T,Hq,Dv]

A backend brings an ``impl`` and calls :func:`define_cached_attention`; the torch.library op and its fake are
built here, so the signature is written once. Passes build calls with :func:`cached_call` and read them with
:func:`cached_inputs` (by name, never by position).

Optional caches are further per-layer cache tensors an op may be handed (mutable, ``None`` when a layer has
none): ``KV_SCALE_CACHES`` are the per-(token, kv-head) scales of an FP8 KV cache (autodeploy/ops/kv_quant.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx

from autodeploy.ops import attention as _attention  # noqa: F401  (freezes the variant registry first)
from autodeploy.ops.variants import param_schema, params

STEP_TENSORS = ("cu_seqlens_q", "seq_lens_kv", "page_table", "slot_mapping", "batch_info")
# The scale tensors of a quantized KV cache, as an op that can read one declares them (``optional_caches``).
KV_SCALE_CACHES = ("k_scale", "v_scale")


@dataclass(frozen=True)
class CachedAttentionOp:
    """A defined cached-attention op: its overload and the names of its inputs, in schema order."""

    qualname: str
    overload: Any
    tensor_inputs: tuple[str, ...]  # q, k, v, extras, caches, step tensors, meta, optional caches
    scalar_inputs: tuple[str, ...]  # scale, then the variant parameters
    optional_inputs: tuple[str, ...] = ()  # optional caches: None when the layer has no such tensor

    @property
    def names(self) -> tuple[str, ...]:
        return self.tensor_inputs + self.scalar_inputs


CACHED_OPS: dict[Any, CachedAttentionOp] = {}
_lib = torch.library.Library("autodeploy", "FRAGMENT")


def define_cached_attention(name: str, impl: Callable[..., torch.Tensor],
                            extra_inputs: Sequence[str] = (), optional_caches: Sequence[str] = ()) -> Any:
    """Define ``autodeploy::<name>`` with the shared schema; ``impl`` is called with every input by keyword
    (variant parameters gathered in ``params``, a dict by name). ``optional_caches``: names of further mutable
    cache inputs the op accepts (e.g. ``KV_SCALE_CACHES``), ``None`` for layers without them; ``impl`` gets
    them by name too. Returns the op's default overload."""
    extra = "".join(f"Tensor {e}, " for e in extra_inputs)
    optional = "".join(f"Tensor(c{i}!)? {n}, " for i, n in enumerate(optional_caches))
    schema = (f"{name}(Tensor q, Tensor k, Tensor v, {extra}Tensor(a!) k_cache, Tensor(b!) v_cache, "
              + "".join(f"Tensor {s}, " for s in STEP_TENSORS)
              + f"Tensor[] meta, {optional}float scale, {param_schema()}) -> Tensor")
    _lib.define(schema)
    # optional caches after meta: the inputs of ops without them keep their positions
    tensor_inputs = ("q", "k", "v", *extra_inputs, "k_cache", "v_cache", *STEP_TENSORS, "meta", *optional_caches)
    param_names = tuple(p.name for p in params())
    names = tensor_inputs + ("scale",) + param_names

    def bind(args, kwargs) -> dict:
        bound = dict(zip(names, args), **kwargs)
        inputs = {n: bound[n] for n in tensor_inputs + ("scale",)}
        inputs["params"] = {n: bound.get(n) for n in param_names}
        return inputs

    def kernel(*args, **kwargs):
        return impl(**bind(args, kwargs))

    def fake(*args, **kwargs):
        b = bind(args, kwargs)
        return b["q"].new_empty((b["q"].shape[0], b["q"].shape[1], b["v_cache"].shape[-1]))

    _lib.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"autodeploy::{name}")(fake)
    overload = getattr(torch.ops.autodeploy, name).default
    CACHED_OPS[overload] = CachedAttentionOp(f"autodeploy::{name}", overload, tensor_inputs, ("scale",) + param_names,
                                             tuple(optional_caches))
    return overload


def cached_op_info(target: Any) -> CachedAttentionOp | None:
    """The definition of a cached-attention op (an overload or its packet), or None for any other target."""
    if target in CACHED_OPS:
        return CACHED_OPS[target]
    return CACHED_OPS.get(getattr(getattr(target, "overloadpacket", None), "default", None))


def is_cached_attention(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and cached_op_info(node.target) is not None


def cached_call(graph: fx.Graph, op: Any, inputs: dict[str, Any]) -> fx.Node:
    """A call of cached op ``op`` from inputs by name: tensors positionally in schema order, ``scale`` and the
    variant parameters as keywords (only the active ones); optional caches left out are None. Unknown or missing
    names raise (a cache the op does not declare is unknown)."""
    info = cached_op_info(op)
    if info is None:
        raise KeyError(f"{op} is not a cached-attention op (define it with define_cached_attention)")
    unknown = set(inputs) - set(info.names)
    missing = set(info.tensor_inputs + ("scale",)) - set(info.optional_inputs) - set(inputs)
    if unknown or missing:
        raise KeyError(f"{info.qualname}: unknown inputs {sorted(unknown)}, missing {sorted(missing)}")
    args = tuple(inputs.get(n) for n in info.tensor_inputs)
    kwargs = {n: inputs[n] for n in info.scalar_inputs if inputs.get(n) is not None}
    return graph.call_function(info.overload, args, kwargs)


def cached_inputs(node: fx.Node) -> dict[str, Any]:
    """A cached-attention call's inputs by name (unset variant parameters are None)."""
    info = cached_op_info(node.target)
    if info is None:
        raise KeyError(f"{node.target} is not a cached-attention op")
    bound = dict(zip(info.names, node.args), **node.kwargs)
    return {n: bound.get(n) for n in info.names}
