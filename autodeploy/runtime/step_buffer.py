"""The pinned host buffer one step's sampled tokens, logit-row sums and sampler parameters share.

Each section starts 16 bytes into the buffer's alignment: Triton specialises a kernel on whether each pointer is
16-byte aligned, so a section at an odd 8-byte offset (the sums after an odd number of int64 tokens) would be a
second kernel variant, compiled on first use in the middle of serving (an 8B continuous-batching run paid ~0.25 s
of such compiles), and one the start-up warm-up, which allocates the buffer the same way, never met.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autodeploy.backends.triton.kernels.sampling import NUM_FIELDS

__all__ = ["StepHostBuffer", "step_host_buffer"]


@dataclass(frozen=True)
class StepHostBuffer:
    tokens: torch.Tensor  # int64 [n]
    row_sums: torch.Tensor  # float32 [n]
    params: torch.Tensor  # int32 [n, NUM_FIELDS]


def _even(i: int) -> int:
    return i + (i & 1)


def step_host_buffer(n: int, pin_memory: bool = True) -> StepHostBuffer:
    """Views of one pinned int64 allocation for ``n`` rows, every section 16-byte aligned."""
    if n < 0:
        raise ValueError(f"step_host_buffer needs a row count >= 0, got {n}")
    tok, sums, prm = _even(n), _even((n + 1) // 2), _even((NUM_FIELDS * n + 1) // 2)
    buf = torch.empty((tok + sums + prm,), dtype=torch.int64, pin_memory=pin_memory)
    return StepHostBuffer(
        tokens=buf[:n],
        row_sums=buf[tok:tok + sums].view(torch.float32)[:n],
        params=buf[tok + sums:].view(torch.int32)[:NUM_FIELDS * n].view(n, NUM_FIELDS),
    )
