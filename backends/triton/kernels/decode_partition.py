"""The flash-decoding work partition (``partition.decode_partition``) as one kernel.

The torch derivation is ~30 small ops; in a captured batch-1 decode step they were ~30 of the ~50 kernels that run
before the first layer (about 40 us of a 1.3 ms Llama-1B step on H100). Here every program recomputes the few
per-sequence numbers (chunk size, split counts and their prefix sum, O(S)) and fills one block of work items,
so no program waits for another. Results equal the torch derivation exactly (integer arithmetic throughout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_partition_kernel"]

# Bound on the [items, sequences] comparison tile a program holds (searchsorted by counting). Smaller tiles also
# mean more programs working in parallel (64 sequences: ~100 items were one program with an 8,192-element tile).
_TILE = 2048


# Uncaptured steps change the sequence count every step: unspecialised integers keep Triton from compiling a new
# variant whenever one of them flips between 1, a multiple of 16 and neither (only the power-of-two blocks vary).
@triton.jit(do_not_specialize=["S", "W", "target", "window", "align", "min_chunk"])
def _decode_partition_kernel(
    seq_lens_ptr, cu_ptr, work_ptr, split_ptr, S, W, target, window, align, min_chunk,
    BLOCK_S: tl.constexpr, BLOCK_I: tl.constexpr,
):
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    kv = tl.load(seq_lens_ptr + s, mask=s_ok, other=0).to(tl.int64)
    q_len = tl.load(cu_ptr + s + 1, mask=s_ok, other=0) - tl.load(cu_ptr + s, mask=s_ok, other=0)
    is_decode = (q_len == 1) & s_ok
    if window > 0:
        first = tl.maximum(kv - window, 0)
    else:
        first = tl.zeros_like(kv)
    visible = tl.where(is_decode, kv - first, 0)
    total = tl.sum(visible, 0)
    chunk = (total + target - 1) // target
    chunk = tl.maximum((chunk + align - 1) // align * align, tl.maximum(align, min_chunk))
    n_split = tl.where(is_decode, tl.maximum((visible + chunk - 1) // chunk, 1), 0)
    ends = tl.cumsum(n_split, 0)  # split_start[1:]
    starts = ends - n_split
    if tl.program_id(0) == 0:
        tl.store(split_ptr + s + 1, ends.to(tl.int32), mask=s_ok)
        tl.store(split_ptr, 0)
    item = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    # The [items, sequences] tiles below are int32 (split counts and key positions are below 2^31): int64 tiles
    # (emulated as pairs of 32-bit ops) of 8,192 elements in one program took 22 us for 64 sequences on an H100
    # (191 registers per thread, benchmarks/kernel_resources.py); now 3.3 us and 56 registers.
    ends32, starts32, first32, kv32 = ends.to(tl.int32), starts.to(tl.int32), first.to(tl.int32), kv.to(tl.int32)
    # searchsorted(split_start[1:], item, right=True), clamped to the last sequence
    seq = tl.minimum(tl.sum(((ends32[None, :] <= item[:, None]) & s_ok[None, :]).to(tl.int32), 1), S - 1)
    pick = s[None, :] == seq[:, None]
    start_of = tl.sum(tl.where(pick, starts32[None, :], 0), 1)
    first_of = tl.sum(tl.where(pick, first32[None, :], 0), 1)
    kv_of = tl.sum(tl.where(pick, kv32[None, :], 0), 1)
    key_lo = first_of.to(tl.int64) + (item - start_of).to(tl.int64) * chunk
    key_hi = tl.minimum(key_lo + chunk, kv_of.to(tl.int64))
    active = item < tl.sum(n_split, 0)
    row = work_ptr + item.to(tl.int64) * 3
    ok = item < W
    tl.store(row, tl.where(active, seq, -1).to(tl.int32), mask=ok)
    tl.store(row + 1, key_lo.to(tl.int32), mask=ok)
    tl.store(row + 2, key_hi.to(tl.int32), mask=ok)


def decode_partition_kernel(seq_lens_kv: torch.Tensor, cu_seqlens_q: torch.Tensor, *, target: int, window: int,
                            align: int, min_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract and results as :func:`autodeploy.backends.triton.partition.decode_partition`."""
    num_seqs = seq_lens_kv.shape[0]
    n_items = target + num_seqs
    device = seq_lens_kv.device
    work = torch.empty((n_items, 3), dtype=torch.int32, device=device)
    split_start = torch.empty(num_seqs + 1, dtype=torch.int32, device=device)
    block_s = triton.next_power_of_2(max(num_seqs, 1))
    block_i = max(1, min(triton.next_power_of_2(n_items), _TILE // block_s))
    _decode_partition_kernel[(triton.cdiv(n_items, block_i),)](
        seq_lens_kv, cu_seqlens_q, work, split_start, num_seqs, n_items, target, int(window), align, min_chunk,
        BLOCK_S=block_s, BLOCK_I=block_i, num_warps=4,
    )
    return work, split_start
