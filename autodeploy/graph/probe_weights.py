"""Probe weights for passes that run a graph region on sample inputs while the weights are not loaded yet.

Under tensor parallelism from a checkpoint directory a rank compiles a model whose parameters are *deferred*:
fake tensors (shapes, dtypes and devices, no storage) that are read from the checkpoint only after the passes,
slice by slice (``autodeploy.models.shard_loading``). A pass that verifies a rewrite by running the graph
(``match_moe``'s value probes, ``check_sequence_mixers``' token-mixing probe) checks a *structural* identity:
one that holds for any weights. Such a pass wraps its probe in :func:`probe_weights`, which swaps every deferred
parameter and buffer for a seeded random tensor of the same shape, dtype and device (seeded by name, so every
rank and every run probes the same values) and puts the deferred tensors back afterwards. A pass that needs the
model's *actual* values (a table computed from them) must not use this: it sees the deferred tensor and has to
leave the graph as it is or refuse.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Iterable, Iterator, Optional

import torch


def is_deferred(t: object) -> bool:
    """True for a tensor without values: a fake tensor (deferred weights) or one on the meta device."""
    if not isinstance(t, torch.Tensor):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or is_fake(t)


def probe_tensor(name: str, like: torch.Tensor) -> torch.Tensor:
    """A real stand-in for a deferred tensor, seeded by ``name``, made on its device: matrices
    ``randn / sqrt(fan_in)`` (activations stay O(1) through the layers), vectors (norm weights, biases)
    ``1 + 0.1 randn``, integers zeros."""
    shape, dtype = tuple(like.shape), like.dtype
    device = like.device if like.device.type != "meta" else torch.device("cpu")
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    if len(shape) >= 2:
        return t.mul_(1.0 / math.sqrt(max(1, shape[-1])))
    return t.mul_(0.1).add_(1.0)


@contextlib.contextmanager
def probe_weights(module: torch.nn.Module, targets: Optional[Iterable[str]] = None) -> Iterator[int]:
    """Within the block every deferred parameter/buffer of ``module`` (or only those named in ``targets``:
    attribute paths such as get_attr targets, so a probe of one region does not stand in for the whole model) is
    a seeded random real tensor; yields how many were swapped (0: the weights are real, nothing changed)."""
    wanted = None if targets is None else set(targets)
    swapped: list[tuple[dict, str, object]] = []
    stand_ins: dict[int, torch.Tensor] = {}  # one stand-in per deferred tensor (tied weights stay tied)
    try:
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for store in (sub._parameters, sub._buffers):
                for name, t in list(store.items()):
                    path = f"{prefix}.{name}" if prefix else name
                    if not is_deferred(t) or (wanted is not None and path not in wanted):
                        continue
                    real = stand_ins.get(id(t))
                    if real is None:
                        real = probe_tensor(path, t)
                        if isinstance(t, torch.nn.Parameter):
                            real = torch.nn.Parameter(real, requires_grad=False)
                        stand_ins[id(t)] = real
                    swapped.append((store, name, t))
                    store[name] = real
        yield len(swapped)
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t
