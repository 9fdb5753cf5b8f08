"""Recurrent-state slots: one per live sequence of a stateful model (Mamba/conv mixers, autodeploy/ops/mixers/).

Lifecycle (the KV-cache manager drives it, so a slot lives exactly as long as the sequence's pages):

- **admission** (``KVCacheManager.allocate``): the sequence takes a free slot with its pages; no slot free is
  backpressure (``can_allocate`` is False; the request waits), never a crash;
- **finish / abort / preemption** (``KVCacheManager.free``): the slot returns to the free list;
- **recompute** after a preemption: the sequence takes a slot again and starts at position 0, where the cached
  mixer ops start from a zero state whatever the slot held (no device-side reset needed);
- **swap-out**: not done for stateful models; preemption recomputes (the engine preempts by recomputation);
- **prefix caching**: off for stateful models (``CompiledModel``): a prefix hit would hand over KV pages whose
  recurrent state nothing stores.

Each slot records how many tokens of its sequence its state has consumed (``advance``, called as each step is
built). A step that does not continue exactly there is refused (the state would be silently wrong), and the
engine's repair after a failed step requeues a sequence whose state ran ahead of its committed tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import torch

from autodeploy.errors import CacheCapacityError


class StateSlotAllocator:
    """Slot ownership of stateful sequences; the device tensors belong to the compiled model."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._slot: dict[Hashable, int] = {}
        self._consumed: dict[Hashable, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._slot

    def allocate(self, seq_id: Hashable) -> int:
        if seq_id in self._slot:
            raise ValueError(f"sequence {seq_id!r} already holds state slot {self._slot[seq_id]}")
        if not self._free:
            raise CacheCapacityError(f"no recurrent-state slot free ({self.num_slots} in use)")
        slot = self._free.popleft()
        self._slot[seq_id] = slot
        self._consumed[seq_id] = 0
        return slot

    def free(self, seq_id: Hashable) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is None:
            raise KeyError(f"sequence {seq_id!r} holds no state slot")
        del self._consumed[seq_id]
        self._free.append(slot)

    def slot(self, seq_id: Hashable) -> int:
        return self._slot[seq_id]

    def consumed(self, seq_id: Hashable) -> int:
        """Tokens of the sequence its state holds once the steps built so far have run."""
        return self._consumed[seq_id]

    def advance(self, seq_id: Hashable, start: int, num_new: int) -> int:
        """A step computes tokens ``[start, start + num_new)`` of the sequence: returns its slot and records the
        new count. ``start`` must be where the state stands (0 restarts the sequence from a zero state)."""
        slot = self._slot[seq_id]
        have = self._consumed[seq_id]
        if start != have and start != 0:
            raise RuntimeError(f"sequence {seq_id!r}: a step starts at token {start} but its recurrent state holds "
                               f"{have} tokens; refusing a silently wrong state")
        self._consumed[seq_id] = start + num_new
        return slot

    def all_free(self) -> bool:
        return not self._slot and len(self._free) == self.num_slots

    def check_invariants(self) -> None:
        """Raise AssertionError if a slot is lost, duplicated, or both free and owned (tests)."""
        owned = list(self._slot.values())
        free = list(self._free)
        if len(set(owned)) != len(owned):
            raise AssertionError(f"a state slot has two owners: {self._slot}")
        if set(owned) & set(free) or len(owned) + len(free) != self.num_slots or len(set(free)) != len(free):
            raise AssertionError(f"state slots lost or double counted: owned {sorted(owned)}, free {sorted(free)}")


def allocate_states(backend, specs, names, num_slots: int, device) -> dict[str, torch.Tensor]:
    """The state tensor of every stateful layer: its graph input name -> the backend's ``allocate_state``."""
    if len(specs) != len(names):
        raise TypeError(f"{len(specs)} state specs for {len(names)} state inputs")
    return {name: backend.allocate_state(num_slots, spec, device) for spec, name in zip(specs, names)}


def stateful_lowering(mode: str) -> tuple[str, str]:
    """The lowering a stateful model runs: the torch reference mixer ops read the step's sequence layout on the
    host, so no CUDA graph can capture them; a CUDA-graph mode falls back to its uncaptured form."""
    if "cudagraph" not in mode:
        return mode, ""
    fallback = "torch-compile" if mode.startswith("torch-compile") else "eager"
    return fallback, (f"{mode} -> {fallback}: the stateful mixer ops (torch reference) read the step layout on the "
                      "host, so no CUDA graph captures them")
