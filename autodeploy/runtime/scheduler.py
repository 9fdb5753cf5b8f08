"""In-flight batching scheduler.

Every step: running requests first (oldest first: their decode token, or the next chunk of their prompt),
then waiting requests are admitted FCFS while the token budget, the batch size and the free pages allow.
Prefill is chunked to fit the budget. When pages run out, the newest running request is preempted (its
pages freed, its tokens kept) and recomputed later; greedy output is unchanged by that.
A request's sequences (n samples, beams) are scheduled together or not at all.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from autodeploy.errors import CacheCapacityError
from autodeploy.runtime.kv_cache import KVCacheManager
from autodeploy.runtime.request import Request, Sequence, SeqState

log = logging.getLogger(__name__)


@dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Request] = field(default_factory=list)
    rejected: list[tuple[Request, str]] = field(default_factory=list)
    # requests that outgrew the whole cache (possible only when it holds less than one max_seq_len sequence)
    truncated: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_size: int, max_num_tokens: int,
                 on_preempt: Optional[Callable[[Request], None]] = None):
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.on_preempt = on_preempt

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_running_seqs(self) -> int:
        return sum(len(r.live_seqs()) for r in self.running)

    # ------------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.max_num_tokens
        scheduled: set[int] = set()
        preempted: set[int] = set()
        items = step.items
        n_seqs = 0
        for req in list(self.running):  # kept in arrival order (see _admit)
            if req.order in preempted:
                continue
            seqs = req.live_seqs()
            if len(seqs) == 1:  # fast path: one sequence (decode: one token)
                seq = seqs[0]
                n = seq.num_pending
                if n > budget:
                    n = budget
                if n == 0:
                    continue
                grown = self._grow(seq, seq.num_computed + n)
                if grown is None:
                    step.truncated.append(req)
                    continue
                if not grown and not self._reserve(req, seqs, [n], scheduled, step, preempted):
                    continue
                items.append((seq, n))
                scheduled.add(req.order)
                budget -= n
                continue
            want = [min(s.num_pending, budget) for s in seqs]
            total = sum(want)
            if total > budget or 0 in want:
                continue  # out of budget this step; it keeps its pages
            try:
                ok = self._reserve(req, seqs, want, scheduled, step, preempted)
            except CacheCapacityError:
                step.truncated.append(req)
                continue
            if not ok:
                continue
            items.extend(zip(seqs, want))
            scheduled.add(req.order)
            budget -= total
        for req in self.running:
            n_seqs += len(req.live_seqs())
        while self.waiting and budget > 0 and n_seqs < self.max_batch_size:
            req = self.waiting[0]
            seq = req.live_seqs()
            if n_seqs + len(seq) > self.max_batch_size:
                break
            if not all(self.kv.can_allocate(s.token_ids) for s in seq) or \
                    sum(self.kv.pages_needed(len(s.token_ids)) for s in seq) > self.kv.num_free_pages:
                if not self.running and not step.items:
                    self.waiting.popleft()
                    step.rejected.append((req, "the KV cache cannot hold this request even alone"))
                    continue
                break
            self.waiting.popleft()
            try:
                for s in seq:
                    s.num_computed = self.kv.allocate(s.seq_id, s.token_ids)
                    s.state = SeqState.RUNNING
            except CacheCapacityError as exc:  # pages went to an earlier sibling: undo and retry later
                for s in seq:
                    if s.seq_id in self.kv:
                        self.kv.free(s.seq_id)
                    s.state, s.num_computed = SeqState.WAITING, 0
                if not self.running and not step.items:
                    step.rejected.append((req, str(exc)))
                    continue
                self.waiting.appendleft(req)
                break
            if req.metrics.num_preemptions == 0:
                req.metrics.num_cached_prompt_tokens = max(s.num_computed for s in seq)
            self._admit(req)
            n_seqs += len(seq)
            want = [min(s.num_pending, budget) for s in seq]
            if sum(want) > budget:
                break  # admitted; it runs next step
            # allocate() reserved the prompt pages; ensure_slots also covers copy-on-write of shared pages
            if not all(self.kv.ensure_slots(s.seq_id, s.num_computed + w) for s, w in zip(seq, want)):
                break
            step.items.extend(zip(seq, want))
            scheduled.add(req.order)
            budget -= sum(want)
        return step

    def _admit(self, req: Request) -> None:
        """Insert into ``running`` keeping arrival order (a resumed request goes back to its place)."""
        if not self.running or self.running[-1].order < req.order:
            self.running.append(req)
        else:
            bisect.insort(self.running, req, key=lambda r: r.order)

    def _grow(self, seq: Sequence, total: int) -> Optional[bool]:
        """``ensure_slots``; None when the sequence can never fit, even alone."""
        try:
            return self.kv.ensure_slots(seq.seq_id, total)
        except CacheCapacityError:
            return None

    def _reserve(self, req: Request, seqs: list[Sequence], want: list[int], scheduled: set[int],
                 step: ScheduledStep, preempted: set[int]) -> bool:
        """Make room for ``req``'s tokens, preempting the newest other running requests if needed."""
        while True:
            if all(self.kv.ensure_slots(s.seq_id, s.num_computed + w) for s, w in zip(seqs, want)):
                return True
            victims = [r for r in self.running if r is not req and r.order not in scheduled]
            victim = max(victims, key=lambda r: r.order) if victims else req
            self.preempt(victim)
            preempted.add(victim.order)
            step.preempted.append(victim)
            if victim is req:
                return False

    def preempt(self, req: Request) -> None:
        for s in req.live_seqs():
            if s.seq_id in self.kv:
                self.kv.free(s.seq_id)
            s.num_computed = 0
            s.state = SeqState.WAITING
        req.metrics.num_preemptions += 1
        if self.on_preempt is not None:
            self.on_preempt(req)
        self.running.remove(req)
        # back to the front, oldest first, so preempted work resumes before new arrivals
        pos = 0
        while pos < len(self.waiting) and self.waiting[pos].order < req.order:
            pos += 1
        self.waiting.insert(pos, req)
        log.info("preempted request %s (%d tokens recomputed later)", req.request_id,
                 sum(len(s.token_ids) for s in req.live_seqs()))

    def finish(self, req: Request) -> None:
        for s in req.seqs:
            if s.seq_id in self.kv:
                self.kv.free(s.seq_id)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
