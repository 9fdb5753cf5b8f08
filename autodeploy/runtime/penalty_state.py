"""Device-resident penalty state: what the fused sampling kernel needs to apply repetition, frequency and
presence penalties without a host round trip.

The state is one device tensor ``[rows, V]`` (``backends/triton/kernels/sampling.py`` defines the encoding:
``(count << 1) | in_prompt`` per token), one row per running penalized sequence. The kernel adds the token it
picks to its row, so on the asynchronous path the counts stay current on the device while the host has not
read the token yet. The host side here only decides which row a sequence uses and when a row must be
rebuilt from the sequence's tokens.

**Staleness by length.** A row records the token count it reflects once the launched kernel has run
(``after + 1``: the context plus the token being drawn). A sampling step for a sequence whose context length
``after`` differs from that (its last token came from the host path, a step was rolled back, the request was
preempted and is recomputed, the row is new) rebuilds the row from ``token_ids[:after]`` first: one
host-to-device copy, no wait. Paths that bypass the kernel or undo tokens also drop the record
(:meth:`PenaltyState.invalidate`), so a coincidence of lengths can never reuse a row that counts a different
token.

**Memory.** Allocated on the first penalized request only, and grown by doubling to the peak number of
penalized sequences sampling at once: ``V`` x 2 bytes per row (int16 when every count fits exactly, i.e.
``max_seq_len < 16384``), else 4 bytes; a 128k vocabulary at 256 rows is 64 MB (int16) or 128 MB (int32).
Rows of finished or preempted sequences are reclaimed when a new row is needed; the tensor is freed when no
sequence holding a row is running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from autodeploy.backends.triton.kernels.sampling import penalty_state_dtype, write_penalty_rows
from autodeploy.runtime.request import SeqState

__all__ = ["PenaltyState"]

log = logging.getLogger(__name__)


@dataclass
class _Row:
    seq: Any  # runtime.request.Sequence
    row: int
    reflected: int  # tokens (prompt + output) the row counts once the last launched kernel has run; -1: stale


class PenaltyState:
    """Row assignment and rebuilds for the ``penalties`` tensor of :func:`sample_rows`."""

    def __init__(self, vocab_size: int, device: torch.device | str, max_count: int, initial_rows: int = 1):
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.dtype = penalty_state_dtype(max_count)
        self.tensor: Optional[torch.Tensor] = None
        self._initial = max(1, int(initial_rows))
        self._by_seq: dict[int, _Row] = {}  # seq_id -> its row
        self._free: list[int] = []
        self.num_rebuilds = 0  # rows (re)written from host tokens, for tests and diagnostics

    @property
    def num_rows(self) -> int:
        return 0 if self.tensor is None else self.tensor.shape[0]

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def in_sync(self, seq: Any, after: int) -> bool:
        """Whether ``seq``'s row already counts exactly its first ``after`` tokens (no rebuild needed)."""
        rec = self._by_seq.get(seq.seq_id)
        return rec is not None and rec.reflected == after

    def assign(self, seqs: Sequence[Any], afters: Sequence[int], penalized: Sequence[bool]) -> list[int]:
        """Rows for a launch (-1 where ``penalized`` is false), rebuilding stale ones from ``token_ids``;
        afterwards each row is taken to count its token of this launch too.

        ``afters[i]``: the context length of ``seqs[i]`` at this step. A stale row needs the whole context on
        the host (``len(token_ids) == after``); the engine never launches ahead in that case."""
        rows = [-1] * len(seqs)
        stale: list[tuple[int, Any, int]] = []
        batch = {s.seq_id for s, p in zip(seqs, penalized) if p}
        for i, (s, after, p) in enumerate(zip(seqs, afters, penalized)):
            if not p:
                continue
            rec = self._by_seq.get(s.seq_id)
            if rec is None:
                rec = _Row(s, self._alloc(batch), -1)
                self._by_seq[s.seq_id] = rec
            if rec.reflected != after:
                if len(s.token_ids) != after:
                    raise RuntimeError(f"penalty state of sequence {s.seq_id} is stale and its context is not on "
                                       f"the host ({len(s.token_ids)} tokens known, {after} in context)")
                stale.append((rec.row, s, after))
            rows[i] = rec.row
        if stale:
            write_penalty_rows(self.tensor, [r for r, _, _ in stale], [s.token_ids[:s.prompt_len] for _, s, _ in stale],
                               [s.token_ids[s.prompt_len:a] for _, s, a in stale])
            self.num_rebuilds += len(stale)
        for s, after, p in zip(seqs, afters, penalized):
            if p:
                self._by_seq[s.seq_id].reflected = after + 1
        return rows

    def invalidate(self, seqs: Optional[Sequence[Any]] = None) -> None:
        """Mark rows stale (all of them when ``seqs`` is None): their next sampling step rebuilds them."""
        recs = self._by_seq.values() if seqs is None else \
            [r for r in (self._by_seq.get(s.seq_id) for s in seqs) if r is not None]
        for rec in recs:
            rec.reflected = -1

    def release(self, seqs: Sequence[Any]) -> None:
        """Give the rows of ``seqs`` back (preemption: a recomputed sequence rebuilds its row)."""
        for s in seqs:
            rec = self._by_seq.pop(s.seq_id, None)
            if rec is not None:
                self._free.append(rec.row)

    def release_if_idle(self) -> None:
        """Free the tensor when no sequence holding a row is running any more."""
        if self.tensor is not None and not any(_running(r.seq) for r in self._by_seq.values()):
            log.debug("penalty state idle: freeing %d rows (%d bytes)", self.num_rows, self.nbytes)
            self.tensor, self._by_seq, self._free = None, {}, []

    # -- rows ----------------------------------------------------------------------------------------------
    def _alloc(self, batch: set[int]) -> int:
        if not self._free:
            self._reclaim(batch)
        if not self._free:
            self._grow()
        return self._free.pop()

    def _reclaim(self, batch: set[int]) -> None:
        """Rows of sequences that are not running (finished, aborted, preempted) and not in this launch. Work
        still queued on the stream for such a row runs before the rebuild that reuses it (stream order)."""
        for sid, rec in list(self._by_seq.items()):
            if sid not in batch and not _running(rec.seq):
                del self._by_seq[sid]
                self._free.append(rec.row)

    def _grow(self) -> None:
        old = self.tensor
        n_old = 0 if old is None else old.shape[0]
        n_new = max(self._initial, 2 * n_old)
        new = torch.zeros((n_new, self.vocab_size), dtype=self.dtype, device=self.device)
        if old is not None:
            new[:n_old].copy_(old)
        self.tensor = new
        self._free.extend(range(n_new - 1, n_old - 1, -1))
        log.debug("penalty state: %d rows x %d tokens (%s, %d bytes)", n_new, self.vocab_size, self.dtype,
                  self.nbytes)


def _running(seq: Any) -> bool:
    return seq.state is SeqState.RUNNING
