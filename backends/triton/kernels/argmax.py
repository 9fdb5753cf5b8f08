"""Row-wise argmax over the vocabulary, the greedy token pick of every decode step.

``torch.argmax`` reduces each row of ``[B, V]`` logits in a single thread block: on an H100 a 128k-vocabulary row
took 38 us inside a Llama-1B batch-1 engine step (``benchmarks/diag_decode_step.py --engine``; 27 us alone,
``benchmarks/bench_argmax.py``), 3% of the step, for 256 KB that the GPU reads in a fraction of a microsecond. Here every row is split into chunks: one program per chunk finds the
chunk's maximum and its first index, then one program per row picks the winning chunk. Semantics are
``torch.argmax``'s: ties go to the lowest index and NaN counts as larger than any number.

``host_out``: a pinned host tensor the tokens are also written to, straight from the second kernel (mapped
memory): the engine reads tokens on the host every step, and a device-to-host copy through the copy engine
cost ~8 us of GPU idle time between steps on an H100.

``row_sums``: an fp32 ``[B]`` tensor (pinned host memory too, e.g. a view of the same buffer) that receives each
row's fp32 sum from the same pass: the engine's finiteness check (a NaN or inf anywhere makes the sum non-finite)
then costs no launch of its own.

Runs as Triton kernels on CUDA tensors; everything else, or a machine without Triton, uses ``torch.argmax``
(tests run :func:`chunked_argmax` itself on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is an optional extra
    _HAS_TRITON = False

__all__ = ["argmax_rows", "chunked_argmax"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Elements per first-stage program: 126 programs per row for a 128k vocabulary. On an H100 (bench_argmax.py,
# CUDA-graph replays, bf16 [1, 128256]): 1024 -> 3.7 us, 2048 -> 4.1, 4096 -> 4.3; torch.argmax 26.7 us.
_CHUNK = 1024


def argmax_rows(x: torch.Tensor, host_out: Optional[torch.Tensor] = None,
                row_sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for 2-D ``x``, as int64 on x's device; also into ``host_out`` (asynchronously), and
    each row's fp32 sum into ``row_sums`` when given."""
    if x.dim() != 2:
        raise ValueError(f"argmax_rows takes [B, V], got shape {tuple(x.shape)}")
    if _HAS_TRITON and x.is_cuda and x.dtype in _DTYPES and x.shape[0] and x.shape[1]:
        return chunked_argmax(x, host_out, row_sums)
    out = x.argmax(dim=-1)
    if host_out is not None:
        host_out.copy_(out, non_blocking=True)
    if row_sums is not None:
        row_sums.copy_(torch.sum(x, dim=-1, dtype=torch.float32), non_blocking=True)
    return out


def _check_out(t: Optional[torch.Tensor], name: str, b: int, dtype: torch.dtype, x: torch.Tensor) -> None:
    if t is not None and (t.shape != (b,) or t.dtype != dtype or not t.is_contiguous()
                          or (x.is_cuda and t.device.type == "cpu" and not t.is_pinned())):
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape ({b},), pinned when on the host")


def chunked_argmax(x: torch.Tensor, host_out: Optional[torch.Tensor] = None,
                   row_sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The two Triton kernels behind :func:`argmax_rows` (any device Triton runs on)."""
    b, v = x.shape
    if b == 0 or v == 0:
        return x.argmax(dim=-1)  # torch's own result (or error) for an empty reduction
    out = torch.empty((b,), dtype=torch.int64, device=x.device)
    _check_out(host_out, "host_out", b, torch.int64, x)
    _check_out(row_sums, "row_sums", b, torch.float32, x)
    if x.stride(1) != 1:
        x = x.contiguous()
    chunk = min(_CHUNK, triton.next_power_of_2(v))
    n_chunks = triton.cdiv(v, chunk)
    part_val = torch.empty((b, n_chunks), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((b, n_chunks), dtype=torch.int32, device=x.device)
    sums = row_sums is not None
    part_sum = torch.empty((b, n_chunks), dtype=torch.float32, device=x.device) if sums else part_val
    _chunk_argmax_kernel[(n_chunks, b)](x, part_val, part_idx, part_sum, v, x.stride(0), n_chunks, CHUNK=chunk,
                                        SUMS=sums, num_warps=8 if chunk >= 2048 else 4)
    _merge_argmax_kernel[(b,)](part_val, part_idx, part_sum, out, host_out if host_out is not None else out,
                               row_sums if sums else part_val, n_chunks,
                               BLOCK=max(2, triton.next_power_of_2(n_chunks)), TO_HOST=host_out is not None,
                               SUMS=sums)
    return out


if _HAS_TRITON:

    @triton.jit
    def _first_max(vals, idx, ok):
        """(max, its lowest index) over ``vals`` where ``ok``; a NaN wins over every number (lowest NaN first)."""
        big: tl.constexpr = 2147483647
        is_nan = (vals != vals) & ok
        nan_idx = tl.min(tl.where(is_nan, idx, big), 0)
        finite = tl.where(ok & (vals == vals), vals, float("-inf"))
        best = tl.max(finite, 0)
        best_idx = tl.min(tl.where(ok & (finite == best), idx, big), 0)
        has_nan = nan_idx < big
        return tl.where(has_nan, float("nan"), best), tl.where(has_nan, nan_idx, best_idx)

    @triton.jit(do_not_specialize=["v", "stride_row", "n_chunks"])
    def _chunk_argmax_kernel(x_ptr, part_val_ptr, part_idx_ptr, part_sum_ptr, v, stride_row, n_chunks,
                             CHUNK: tl.constexpr, SUMS: tl.constexpr):
        chunk = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        ok = offs < v
        vals = tl.load(x_ptr + row * stride_row + offs, mask=ok, other=float("-inf")).to(tl.float32)
        best, best_idx = _first_max(vals, offs, ok)
        tl.store(part_val_ptr + row * n_chunks + chunk, best)
        tl.store(part_idx_ptr + row * n_chunks + chunk, best_idx)
        if SUMS:
            tl.store(part_sum_ptr + row * n_chunks + chunk, tl.sum(tl.where(ok, vals, 0.0), 0))

    @triton.jit(do_not_specialize=["n_chunks"])
    def _merge_argmax_kernel(part_val_ptr, part_idx_ptr, part_sum_ptr, out_ptr, host_ptr, sums_ptr, n_chunks,
                             BLOCK: tl.constexpr, TO_HOST: tl.constexpr, SUMS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        ok = offs < n_chunks
        vals = tl.load(part_val_ptr + row * n_chunks + offs, mask=ok, other=float("-inf"))
        idx = tl.load(part_idx_ptr + row * n_chunks + offs, mask=ok, other=0)
        # the chunks are in index order, so the lowest winning chunk holds the lowest winning index
        _best, chunk = _first_max(vals, offs, ok)
        winner = tl.sum(tl.where(offs == chunk, idx, 0), 0)
        tl.store(out_ptr + row, winner.to(tl.int64))
        if TO_HOST:
            tl.store(host_ptr + row, winner.to(tl.int64))
        if SUMS:
            tl.store(sums_ptr + row, tl.sum(tl.load(part_sum_ptr + row * n_chunks + offs, mask=ok, other=0.0), 0))
