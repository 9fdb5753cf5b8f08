"""CUDA-graph lowering for decode steps.

Decode-only steps are padded to a batch-size bucket and replayed from a graph captured once per bucket. Each
bucket owns one fixed-address device buffer holding every step input; ``nest_sequences`` refreshes it in place
with its single upload, so replay just rereads it. ``CompiledModel.warmup`` captures every bucket at start-up
(``compile(warmup=True)``, the default); a bucket still missing is captured on its first step. Padding sequences
write into a scratch page that the cache manager never hands out. Prefill and mixed steps run uncaptured.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from autodeploy.metadata import SequenceChunk, StepBatch, decode_step_nbytes

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class _Bucket:
    size: int
    buffer: torch.Tensor
    graph: Optional[torch.cuda.CUDAGraph] = None
    output: Optional[torch.Tensor] = None
    capture_s: float = 0.0


class CudaGraphRunner:
    def __init__(self, cm: Any, fn: Callable, max_batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS):
        self.cm = cm
        self.fn = fn
        sizes = sorted({b for b in buckets if b < max_batch_size} | {max_batch_size})
        self.buckets = sizes
        self.pages_width = math.ceil(cm.max_seq_len / cm.page_size)
        self.scratch_page = cm.scratch_page
        self.pool = torch.cuda.graph_pool_handle()
        self._entries: dict[int, _Bucket] = {}
        self.captured: dict[int, float] = {}
        self.replays: dict[int, int] = {}  # bucket -> steps replayed (start-up captures included)

    def handles(self, chunks: Sequence[SequenceChunk], all_logits: bool) -> bool:
        return (not all_logits and len(chunks) <= self.buckets[-1] and all(c.num_new == 1 for c in chunks)
                and all(c.want_logits for c in chunks))

    def _bucket(self, n: int) -> _Bucket:
        size = next(b for b in self.buckets if b >= n)
        if size not in self._entries:
            buf = torch.zeros(decode_step_nbytes(size, self.pages_width), dtype=torch.uint8, device=self.cm.device)
            self._entries[size] = _Bucket(size, buf)
        return self._entries[size]

    def pack(self, chunks: Sequence[SequenceChunk], token_src: Optional[torch.Tensor] = None) -> StepBatch:
        entry = self._bucket(len(chunks))
        batch = self.cm.packer.pack(chunks, pad_to=entry.size, pad_page=self.scratch_page,
                                    pages_width=self.pages_width, target=entry.buffer, token_src=token_src)
        batch.bucket = entry.size
        return batch

    def capture_all(self) -> None:
        """Capture every bucket not captured yet, on dummy decodes that write only the scratch page."""
        for size in self.buckets:
            if size not in self._entries or self._entries[size].graph is None:
                self.run(self.pack([SequenceChunk([0], 1, self.cm.scratch_pages(2))] * size))

    def run(self, batch: StepBatch) -> torch.Tensor:
        entry = self._entries[batch.bucket]
        if entry.graph is None:
            self._capture(entry, batch)
        entry.graph.replay()
        self.replays[entry.size] = self.replays.get(entry.size, 0) + 1
        return entry.output

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
        entry.graph, entry.output = graph, (out[0] if isinstance(out, (tuple, list)) else out)
        entry.capture_s = time.perf_counter() - t0
        self.captured[entry.size] = entry.capture_s
        log.info("captured decode CUDA graph for batch bucket %d in %.1f ms", entry.size, entry.capture_s * 1e3)
