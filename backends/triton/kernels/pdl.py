"""Programmatic dependent launch (PDL, Hopper+): let a kernel start while the one before it is still finishing.

At batch-1 decode a step is ~150 short kernels in a row; each pays a launch, a ramp-up and a tail that leave the
memory system idle. With PDL a kernel launched with ``launch_pdl=True`` may be scheduled as soon as every program
of the kernel before it has called :func:`pdl_launch_dependents`; it does its independent work first (a GEMV
streams its first weight tile) and calls :func:`pdl_wait` before it touches anything the earlier kernel writes.

Rules every PDL kernel here follows (so stream order still means data order):
* every program calls ``pdl_wait`` before reading an activation or writing any output, and before it can exit
  (a kernel that completes without waiting would let a later kernel overtake the one before it);
* ``pdl_launch_dependents`` comes after ``pdl_wait``, so at most one kernel runs ahead;
* only constants are read before ``pdl_wait`` (a GEMV's weight): the kernel launched right before a GEMV must
  not write its weight (in a forward it never does; the kernel before a linear is a norm, an activation or an
  attention merge).

Measured on H100 (benchmarks/bench_decode.py, AUTODEPLOY_PDL=0 vs 1): Llama-1B batch-1 steps 1.43 -> 1.35 ms;
batches 8 and 64 unchanged.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # triton >= 3.4 (both versions this project supports have it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # pragma: no cover - older triton
    _HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


__all__ = ["pdl_enabled", "pdl_wait", "pdl_launch_dependents", "launch_options"]


@functools.lru_cache(maxsize=None)
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _selected(kernel: str) -> bool:
    """``AUTODEPLOY_PDL``: 0 (off), 1 (every PDL-capable kernel), or a comma list of kernel kinds."""
    env = os.environ.get("AUTODEPLOY_PDL", "1")
    if env in ("0", "1"):
        return env == "1"
    return kernel in env.split(",")


@functools.lru_cache(maxsize=None)
def _enabled(device_type: str, index: int, kernel: str) -> bool:
    if device_type != "cuda" or not _HAS_GDC or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _selected(kernel) and _capability_ok(index)


def pdl_enabled(device: torch.device, kernel: str = "") -> bool:
    """Whether ``kernel`` (its kind: gemv, norm, act, decode, reduce, quant) launches with PDL on ``device``: a
    Hopper-or-newer GPU, compiled (not interpreted) Triton that has grid dependency control, and selected by
    ``AUTODEPLOY_PDL``. Decided once per (device, kind) and process: it is asked on every kernel launch of
    uncaptured steps, so the environment is not re-read there."""
    if device.type != "cuda":
        return False
    return _enabled("cuda", device.index if device.index is not None else torch.cuda.current_device(), kernel)


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has completed and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_launch_dependents(PDL: tl.constexpr):
    """Allow the next kernel in the stream to start launching its programs."""
    if PDL:
        gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """Extra launch keyword arguments for a kernel launched with (or without) PDL."""
    return {"launch_pdl": True} if pdl else {}
