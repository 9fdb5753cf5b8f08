"""The registry of stateful mixer kinds (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, fx


@dataclass(frozen=True)
class MixerKind:
    """One stateful mixer kind.

    ``state_shape(inputs)``: the per-slot state shape from the canonical call's inputs by name (their fake
    values), ``state_dtype(model_dtype)``: the state's dtype. ``cached_inputs``: the cached op's inputs in schema
    order (the canonical inputs, then ``state`` and the step tensors). ``standin(inputs)``: a token-local function
    of the cached call's inputs with the op's output shape, which the mixer check runs in its place."""

    def inputs(self, node: fx.Node, names: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """A canonical or cached call's inputs by name (``names``: the schema order, default the canonical
        one), omitted ones at their defaults."""
        return {**dict(self.defaults), **{k: v for k, v in bind(names or self.canonical_inputs, node).items()
                                          if v is not None or k not in dict(self.defaults)}}

    name: str
    canonical: Any
    cached: Any
    canonical_inputs: tuple[str, ...]
    cached_inputs: tuple[str, ...]
    state_shape: Callable[[dict[str, Any]], tuple[int, ...]]
    state_dtype: Callable[[torch.dtype], torch.dtype]
    standin: Callable[..., torch.Tensor]
    defaults: tuple[tuple[str, Any], ...] = ()  # values of inputs a call may leave out (e.g. a default activation)


MIXER_KINDS: dict[str, MixerKind] = {}
# Step tensors every cached mixer op reads after its state, in this order (docs/contracts.md).
STATE_STEP_TENSORS = ("cu_seqlens_q", "seq_lens_kv", "state_slots")


def register_mixer(kind: MixerKind) -> MixerKind:
    if kind.name in MIXER_KINDS:
        raise ValueError(f"mixer kind {kind.name!r} is already registered")
    MIXER_KINDS[kind.name] = kind
    return kind


def _target_default(target: Any) -> Any:
    return getattr(getattr(target, "overloadpacket", None), "default", target)


def canonical_mixer_kind(node: Any) -> Optional[MixerKind]:
    """The kind whose canonical op ``node`` calls, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target = _target_default(node.target)
    return next((k for k in MIXER_KINDS.values() if target in (k.canonical, getattr(k.canonical, "default", None))),
                None)


def cached_mixer_kind(node: Any) -> Optional[MixerKind]:
    """The kind whose cached op ``node`` calls, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    target = _target_default(node.target)
    return next((k for k in MIXER_KINDS.values() if target in (k.cached, getattr(k.cached, "default", None))), None)


def bind(names: tuple[str, ...], node: fx.Node) -> dict[str, Any]:
    """A call's inputs by name (positional in ``names`` order, then keywords)."""
    bound = dict(zip(names, node.args), **node.kwargs)
    return {n: bound.get(n) for n in names}


def step_rows(cu_seqlens_q: torch.Tensor, seq_lens_kv: torch.Tensor, state_slots: torch.Tensor):
    """Per packed sequence ``(first_token, num_new, continues, slot)``: ``continues`` when tokens before this
    chunk exist (then the state slot holds them); a sequence starting at position 0 starts from a zero state,
    whatever its slot held (a reused or recomputed slot needs no reset). Slot -1: no slot (dummy steps), never
    read or written. Host lists: the torch reference loops on the host."""
    cu = cu_seqlens_q.tolist()
    kv = seq_lens_kv.tolist()
    slots = state_slots.tolist()
    rows = []
    for s in range(len(kv)):
        n = cu[s + 1] - cu[s]
        if n <= 0:
            continue
        rows.append((cu[s], n, kv[s] - n > 0, int(slots[s])))
    return rows


def scan_sequences(scan, x: torch.Tensor, state: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   seq_lens_kv: torch.Tensor, state_slots: torch.Tensor, rows_of) -> torch.Tensor:
    """The cached form of a recurrent scan, in the flattened layout ``[1, T, ...]``: per packed sequence,
    ``scan(h0, *rows_of(rows))`` -> ``(y, h)`` from its slot's state (zeros at position 0), ``y`` into the
    sequence's output rows (fp32) and ``h`` back into the slot."""
    out = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for first, n, continues, slot in step_rows(cu_seqlens_q, seq_lens_kv, state_slots):
        rows = slice(first, first + n)
        h0 = state[slot] if continues and slot >= 0 else state.new_zeros(state.shape[1:])
        y, h = scan(h0, *rows_of(rows))
        out[rows] = y
        if slot >= 0:
            state[slot] = h.to(state.dtype)
    return out.unsqueeze(0)


@dataclass(frozen=True)
class ScanOps:
    """The plain-torch references behind a scan kind's two ops (what tests and fast kernels compare against)."""

    reference: Callable[..., Tensor]
    cached_reference: Callable[..., Tensor]


def define_scan_ops(name: str, scan_with_state: Callable, zero_state: Callable[[Tensor, Tensor, Tensor], Tensor],
                    layout: str) -> ScanOps:
    """The ops of a recurrent scan over ``(x, dt, A, B, C)``: ``autodeploy::{name}(x, dt, A, B, C) -> y`` (fp32,
    each batch row from ``zero_state(x, A, B)``) and ``autodeploy::cached_{name}(x, dt, A, B, C, state!,
    cu_seqlens_q, seq_lens_kv, state_slots)`` in the flattened layout ``layout`` (each packed sequence continues
    from its slot), both from ``scan_with_state(h0, x, dt, A, B, C) -> (y, h)`` over one sequence."""

    def reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        zero = zero_state(x, A, B)
        return torch.stack([scan_with_state(zero, x[b], dt[b], A, B[b], C[b])[0] for b in range(x.shape[0])])

    def cached_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor,
                         cu_seqlens_q: Tensor, seq_lens_kv: Tensor, state_slots: Tensor) -> Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"cached_{name} takes the flattened layout {layout}, got {tuple(x.shape)}")
        return scan_sequences(scan_with_state, x, state, cu_seqlens_q, seq_lens_kv, state_slots,
                              lambda rows: (x[0, rows], dt[0, rows], A, B[0, rows], C[0, rows]))

    def fake(x: Tensor, *_: Tensor) -> Tensor:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)

    torch.library.custom_op(f"autodeploy::{name}", reference, mutates_args=()).register_fake(fake)
    torch.library.custom_op(f"autodeploy::cached_{name}", cached_reference,
                            mutates_args=("state",)).register_fake(fake)
    return ScanOps(reference, cached_reference)
