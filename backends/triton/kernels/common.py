"""Small launch-side helpers shared by the Triton kernels' Python launchers."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["interpreted", "asm_ok", "rows_2d"]


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in the Triton interpreter (``TRITON_INTERPRET=1`` when it was defined)."""
    return type(kernel).__name__ == "InterpretedFunction"


def asm_ok(kernel, x: Tensor) -> bool:
    """PTX inline assembly: compiled kernels on NVIDIA GPUs (not the interpreter, not ROCm)."""
    return x.is_cuda and torch.version.hip is None and not interpreted(kernel)


def rows_2d(x: Tensor) -> Tensor:
    """``x [..., K]`` as ``[rows, K]`` with a unit last stride (a view where it can be)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
