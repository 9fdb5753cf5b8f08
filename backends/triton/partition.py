"""The flash-decoding work partition: which slice of which decode sequence each split-K program reduces.

It is a *metadata field* of the Triton backend: derived on the device, inside the one ``prepare_metadata`` node,
once per forward, and read by every attention layer with the same window (see :mod:`autodeploy.metadata`).

Why a table rather than a uniform split count: a batch mixes short and long contexts. Cutting every sequence into
the same number of splits gives a 32k-token sequence and a 100-token one the same number of programs, so the long
one dominates the runtime. Here the visible keys of all decode sequences are cut into chunks of ONE size, chosen so
the whole batch fills about ``waves`` waves of programs over the SMs; a sequence gets as many splits as its length
needs. The grid stays static (CUDA-graph safe): ``W = target + num_seqs`` work items bound the split count, and
the unused tail is marked idle.

Pure torch, no data-dependent shapes: it runs on fake tensors, inside CUDA graphs and on CPU.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from autodeploy.metadata import register_metadata_field

# Chunks are multiples of this many keys (a multiple of every decode BLOCK_N, so splits are whole tiles).
CHUNK_ALIGN = 64
# Smallest chunk the backend's field uses. Measured on H100 (graph replays, Hkv=8, D=128): B=1 at 512/1k/2k
# keys takes 16.1/19.0/22.3 us with 128-key chunks vs 16.7/19.6/26.8 us with 64 (more partials to merge) and
# 19.2/20.3/23.5 us with 256 (longer serial chains).
MIN_CHUNK = 128
# Programs per SM the partition aims for (split kernel grid = work items x KV heads). Tuned on H100 with
# benchmarks/bench_triton_attention.py --sweep.
DEFAULT_WAVES = 2.0
NOMINAL_SMS = 8  # off-GPU (CPU interpreter): keep the partition small
# Derive the partition with the one-kernel version (kernels/decode_partition.py) on real tensors; the torch ops
# below stay the reference and serve fake tensors (export, shape propagation). A tuning switch for benchmarks.
PARTITION_KERNEL = True


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    """SM count of ``device`` (a nominal count off-GPU)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return NOMINAL_SMS


def target_work_items(num_kv_heads: int, num_sms: int, waves: float = DEFAULT_WAVES) -> int:
    """How many (sequence, chunk) items the split kernel should see so that items x KV heads ~ waves x SMs."""
    return max(1, int(-(-waves * num_sms // max(1, num_kv_heads))))


def decode_partition(seq_lens_kv: Tensor, cu_seqlens_q: Tensor, *, target: int, window: int = 0,
                     align: int = CHUNK_ALIGN, min_chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Partition the visible keys of every decode sequence (``q_len == 1``) into equal chunks.

    Returns ``(work, split_start)``:

    * ``work`` ``[target + S, 3]`` int32: ``(seq, key_lo, key_hi)`` per work item, ``seq = -1`` for idle items;
    * ``split_start`` ``[S + 1]`` int32: sequence ``s`` owns work items ``split_start[s] : split_start[s+1]``
      (none for prefill sequences), so the reduction knows where its partials are and how many.

    ``min_chunk`` keeps short contexts from being cut into many one-tile splits (fewer partials to merge).

    Bound: sum_s ceil(vis_s / chunk) <= total / chunk + S <= target + S, because chunk >= total / target.
    """
    num_seqs = seq_lens_kv.shape[0]
    kv_len = seq_lens_kv.to(torch.int64)
    is_decode = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]) == 1
    first = (kv_len - window).clamp(min=0) if window > 0 else torch.zeros_like(kv_len)
    visible = torch.where(is_decode, kv_len - first, torch.zeros_like(kv_len))
    total = visible.sum()
    chunk = (total + target - 1) // target
    chunk = ((chunk + align - 1) // align * align).clamp(min=max(align, min_chunk))
    n_split = torch.where(is_decode, ((visible + chunk - 1) // chunk).clamp(min=1), torch.zeros_like(kv_len))
    split_start = torch.zeros(num_seqs + 1, dtype=torch.int64, device=kv_len.device)
    split_start[1:] = torch.cumsum(n_split, 0)
    item = torch.arange(target + num_seqs, dtype=torch.int64, device=kv_len.device)
    seq = torch.searchsorted(split_start[1:], item, right=True).clamp(max=num_seqs - 1)
    active = item < split_start[-1]
    key_lo = first[seq] + (item - split_start[seq]) * chunk
    key_hi = torch.minimum(key_lo + chunk, kv_len[seq])
    work = torch.stack([torch.where(active, seq, torch.full_like(seq, -1)), key_lo, key_hi], dim=1)
    return work.to(torch.int32), split_start.to(torch.int32)


def field_params(window: int | None, num_kv_heads: int) -> str:
    """The parameter suffix of a layer's partition fields (layers with equal parameters share the fields)."""
    return f"window={int(window or 0)};kv_heads={int(num_kv_heads)}"


def _kernel_runs_on(t: Tensor) -> bool:
    """Real (not fake) tensors where a Triton kernel can run: a GPU, or the CPU under TRITON_INTERPRET=1."""
    if isinstance(t, FakeTensor) or t.device.type == "meta":
        return False
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def derive_partition(seq_lens_kv: Tensor, cu_seqlens_q: Tensor, *, target: int, window: int = 0
                     ) -> tuple[Tensor, Tensor]:
    """The production partition (``min_chunk=MIN_CHUNK``): one kernel on real tensors where Triton runs, the
    torch ops of :func:`decode_partition` otherwise (fake tensors during export, or PARTITION_KERNEL off)."""
    kwargs = dict(target=target, window=window, align=CHUNK_ALIGN, min_chunk=MIN_CHUNK)
    if PARTITION_KERNEL and seq_lens_kv.shape[0] > 0 and _kernel_runs_on(seq_lens_kv):
        from autodeploy.backends.triton.kernels.decode_partition import decode_partition_kernel

        return decode_partition_kernel(seq_lens_kv, cu_seqlens_q, **kwargs)
    return decode_partition(seq_lens_kv, cu_seqlens_q, **kwargs)


def _partition_field(m: dict, window: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    key = f"_decode_partition:{window}:{kv_heads}"  # both fields come from one computation
    if key not in m:
        seq_lens = m["seq_lens_kv"]
        m[key] = derive_partition(seq_lens, m["cu_seqlens_q"], window=window,
                                  target=target_work_items(kv_heads, device_sms(seq_lens.device)))
    return m[key]


@register_metadata_field("decode_work")
def _decode_work(m: dict, window: int, kv_heads: int) -> Tensor:
    return _partition_field(m, window, kv_heads)[0]


@register_metadata_field("decode_split_start")
def _decode_split_start(m: dict, window: int, kv_heads: int) -> Tensor:
    return _partition_field(m, window, kv_heads)[1]


__all__ = ["decode_partition", "derive_partition", "device_sms", "target_work_items", "field_params", "CHUNK_ALIGN"]
