"""Upload a step's packed inputs to the GPU with one small kernel instead of the copy engine.

Every step sends its packed inputs (a few KB: tokens, positions, page table...) from a pinned staging buffer to
the device, and an asynchronous decode step then overwrites the token slots with the previous step's sampled
tokens, which are already on the device. As ``cudaMemcpyAsync`` calls that was a host-to-device copy and a
device-to-device copy, and on an H100 the switch from kernels to the copy engine and back left the GPU idle for
~10 us between two decode steps (``benchmarks/diag_decode_step.py --engine``). Here one kernel reads the
staging buffer through its mapped device address (pinned memory is device-addressable under unified virtual
addressing) and takes the token slots from the device tokens in the same pass.

Large uploads (a long prompt's tokens, a wide page table) still go through the copy engine, which streams
them faster than a few programs reading across PCIe.
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

__all__ = ["upload", "KERNEL_MAX_BYTES"]

KERNEL_MAX_BYTES = 64 * 1024
_BLOCK = 1024  # int64 words per program


def upload(host: torch.Tensor, dev: torch.Tensor, tokens: Optional[torch.Tensor] = None, token_offset: int = 0,
           use_kernel: Optional[bool] = None) -> None:
    """``dev[:] = host`` (uint8, same size, 8-byte multiple), then int64 words ``token_offset ..`` of ``dev``
    taken from ``tokens`` (an int64 device tensor) instead. Asynchronous on a GPU."""
    if host.numel() != dev.numel() or host.dtype != torch.uint8 or dev.dtype != torch.uint8:
        raise ValueError("upload copies a uint8 buffer to one of the same size")
    n_tok = 0 if tokens is None else tokens.numel()
    if use_kernel is None:
        use_kernel = (_HAS_TRITON and dev.is_cuda and host.is_pinned() and host.numel() <= KERNEL_MAX_BYTES
                      and host.numel() % 8 == 0 and host.data_ptr() % 8 == 0 and dev.data_ptr() % 8 == 0)
    if not use_kernel:
        dev.copy_(host, non_blocking=True)
        if n_tok:
            dev.view(torch.int64)[token_offset:token_offset + n_tok].copy_(tokens.reshape(-1), non_blocking=True)
        return
    n_words = host.numel() // 8
    if token_offset + n_tok > n_words:
        raise ValueError(f"{n_tok} tokens at word {token_offset} do not fit a {n_words}-word buffer")
    dst = dev.view(torch.int64)
    _upload_kernel[(triton.cdiv(n_words, _BLOCK),)](
        host.view(torch.int64), dst, tokens.reshape(-1) if n_tok else dst, n_words, token_offset, n_tok,
        BLOCK=_BLOCK, num_warps=4)


if _HAS_TRITON:

    @triton.jit(do_not_specialize=["n_words", "tok_start", "n_tok"])
    def _upload_kernel(src_ptr, dst_ptr, tok_ptr, n_words, tok_start, n_tok, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n_words
        is_tok = (offs >= tok_start) & (offs < tok_start + n_tok)
        staged = tl.load(src_ptr + offs, mask=ok & ~is_tok, other=0)
        sampled = tl.load(tok_ptr + (offs - tok_start), mask=ok & is_tok, other=0)
        tl.store(dst_ptr + offs, tl.where(is_tok, sampled, staged), mask=ok)
