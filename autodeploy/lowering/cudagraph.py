"""Whole-step CUDA graphs: decode steps per batch-size bucket, mixed/prefill steps per token-count bucket.

Each bucket owns one fixed-address device buffer holding every step input; ``nest_sequences`` refreshes it in
place with its single upload, so replay just rereads it. ``CompiledModel.warmup`` captures every bucket at
start-up (``compile(warmup=True)``, the default); a bucket still missing is captured on its first step.

* :class:`CudaGraphRunner` (decode-only steps): padded to the bucket with dummy one-token sequences that write
  into a scratch page the cache manager never hands out.
* :class:`MixedGraphRunner` (steps with prefill tokens, up to the largest token bucket): the step is packed
  *device-composed* (``metadata.DEVICE_COMPOSED``): padded to the bucket's token count (padding tokens write
  nowhere) and to ``min(tokens, max_batch_size)`` sequences (padding sequences are empty), and the backend's
  attention sizes every launch by tensor shapes alone and reads the split into prefill and decode sequences on
  the device. One graph per token bucket then serves every composition. Backends opt in
  (``AttentionBackend.device_composed_steps``); for the others the lowering uses piecewise graphs
  (:mod:`autodeploy.lowering.piecewise`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from autodeploy.metadata import SequenceChunk, StepBatch, step_nbytes

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Fine steps above ~256 tokens, where a step's GEMMs turn compute-bound and padding rows cost their share
# (8B, 767 tokens padded to 1024: 29.9 vs 26.8 ms eager); below that the weights dominate and padding is cheap.
DEFAULT_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
                         2048)


def non_owning_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over ``t``'s memory that does not keep it alive: a graph output whose block goes back to the
    graph pool once ``t`` is dropped, for later captures to reuse (the private API inductor's CUDA-graph trees
    use; without it ``t`` itself is kept, which costs only memory)."""
    make = getattr(torch._C, "_construct_storage_from_data_pointer", None)
    if make is None or t.device.type != "cuda":
        return t
    st = t.untyped_storage()
    storage = make(st.data_ptr(), t.device, st.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


@dataclass
class _Bucket:
    size: int
    buffer: torch.Tensor
    graph: Optional[torch.cuda.CUDAGraph] = None
    output: Optional[torch.Tensor] = None
    capture_s: float = 0.0


class _BucketedGraphs:
    """One CUDA graph per bucket over the step function ``fn``, all in one graph pool."""

    label = ""

    def __init__(self, cm: Any, fn: Callable, buckets: Sequence[int]):
        self.cm = cm
        self.fn = fn
        self.buckets = list(buckets)
        self.pages_width = math.ceil(cm.max_seq_len / cm.page_size)
        self.pool = torch.cuda.graph_pool_handle()
        self._entries: dict[int, _Bucket] = {}
        self.captured: dict[int, float] = {}  # bucket -> capture seconds
        self.replays: dict[int, int] = {}  # bucket -> steps replayed (start-up captures included)

    def _nbytes(self, size: int) -> int:
        raise NotImplementedError

    def _entry(self, n: int) -> _Bucket:
        size = next(b for b in self.buckets if b >= n)
        if size not in self._entries:
            with torch.inference_mode(False):  # a plain tensor: packing may refresh it outside inference mode
                buf = torch.zeros(self._nbytes(size), dtype=torch.uint8, device=self.cm.device)
            self._entries[size] = _Bucket(size, buf)
        return self._entries[size]

    def _claim(self, batch: StepBatch, entry: _Bucket) -> StepBatch:
        batch.bucket, batch.graph = entry.size, self
        return batch

    def run(self, batch: StepBatch) -> torch.Tensor:
        entry = self._entries[batch.bucket]
        if entry.graph is None:
            self._capture(entry, batch)
        entry.graph.replay()
        self.replays[entry.size] = self.replays.get(entry.size, 0) + 1
        return entry.output

    def _keep(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def _capture(self, entry: _Bucket, batch: StepBatch) -> None:
        t0 = time.perf_counter()
        kwargs = dict(batch.inputs, **self.cm.caches)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: JIT compiles kernels, settles the allocator (KV writes are idempotent)
                self.fn(**kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(**kwargs)
        entry.graph, entry.output = graph, self._keep(out[0] if isinstance(out, (tuple, list)) else out)
        entry.capture_s = time.perf_counter() - t0
        self.captured[entry.size] = entry.capture_s
        log.info("captured %s CUDA graph for bucket %d in %.1f ms", self.label, entry.size, entry.capture_s * 1e3)


class CudaGraphRunner(_BucketedGraphs):
    """Decode-only steps, padded to a batch-size bucket."""

    label = "decode"

    def __init__(self, cm: Any, fn: Callable, max_batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS):
        super().__init__(cm, fn, sorted({b for b in buckets if b < max_batch_size} | {max_batch_size}))

    def _nbytes(self, size: int) -> int:
        return step_nbytes(size, size, self.pages_width)

    def handles(self, chunks: Sequence[SequenceChunk], all_logits: bool) -> bool:
        return (not all_logits and len(chunks) <= self.buckets[-1] and all(c.num_new == 1 for c in chunks)
                and all(c.want_logits for c in chunks))

    def pack(self, chunks: Sequence[SequenceChunk], token_src: Optional[torch.Tensor] = None) -> StepBatch:
        entry = self._entry(len(chunks))
        batch = self.cm.packer.pack(chunks, pad_to=entry.size, pad_page=self.cm.scratch_page,
                                    pages_width=self.pages_width, target=entry.buffer, token_src=token_src)
        return self._claim(batch, entry)

    def capture_all(self) -> None:
        """Capture every bucket not captured yet, on dummy decodes that write only the scratch page."""
        for size in self.buckets:
            if size not in self._entries or self._entries[size].graph is None:
                self.run(self.pack([SequenceChunk([0], 1, self.cm.scratch_pages(2))] * size))


class MixedGraphRunner(_BucketedGraphs):
    """Steps with prefill tokens, device-composed and padded to a token bucket (one graph per bucket).

    A bucket of ``T`` tokens holds ``min(T, max_batch_size)`` sequences (every sequence has a token) and as many
    logits rows. Buckets stop where no step can reach (``max_batch_size x max_seq_len`` tokens) and at the
    compiled ``max_num_tokens``; larger steps run uncaptured (they are GPU-bound). Graph outputs are handed back
    to the shared pool after capture, so all buckets together hold about the memory of the largest one; a
    bucket's logits are valid until the next forward (the engine's contract for every step)."""

    label = "mixed-step"

    def __init__(self, cm: Any, fn: Callable, buckets: Sequence[int] = DEFAULT_TOKEN_BUCKETS):
        cap = min(cm.max_num_tokens, cm.max_batch_size * cm.max_seq_len)
        super().__init__(cm, fn, sorted(b for b in buckets if b <= cap))
        self.disabled = not self.buckets  # no bucket fits: every step runs uncaptured

    def seqs_for(self, tokens: int) -> int:
        return min(tokens, self.cm.max_batch_size)

    def _nbytes(self, size: int) -> int:
        return step_nbytes(size, self.seqs_for(size), self.pages_width)

    def _keep(self, out: torch.Tensor) -> torch.Tensor:
        return non_owning_alias(out)

    def handles(self, chunks: Sequence[SequenceChunk], all_logits: bool) -> bool:
        return (not self.disabled and not all_logits and len(chunks) <= self.cm.max_batch_size
                and sum(c.num_new for c in chunks) <= self.buckets[-1])

    def pack(self, chunks: Sequence[SequenceChunk]) -> StepBatch:
        entry = self._entry(sum(c.num_new for c in chunks))
        batch = self.cm.packer.pack(chunks, pages_width=self.pages_width, target=entry.buffer,
                                    compose_on_device=(entry.size, self.seqs_for(entry.size)))
        return self._claim(batch, entry)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the pool grows once, the smaller graphs reuse its blocks). A
        capture that fails disables the runner with a log line: those steps then run uncaptured."""
        for size in reversed(self.buckets):
            if self.disabled:
                return
            if size not in self._entries or self._entries[size].graph is None:
                self.run(self.pack(self.cm.dummy_prefill(size)))

    def run(self, batch: StepBatch) -> Any:
        try:
            return super().run(batch)
        except Exception as exc:  # noqa: BLE001 - any capture failure: log, disable, run this step eagerly
            if self._entries[batch.bucket].graph is not None:
                raise
            self.disabled = True
            log.warning("mixed-step CUDA graphs disabled: capturing the %d-token bucket failed (%s: %s); "
                        "prefill/mixed steps run uncaptured", batch.bucket, type(exc).__name__, exc)
            torch.cuda.synchronize()
            return self.fn(**batch.inputs, **self.cm.caches)  # a device-composed step runs eagerly as well
