"""In-flight batching scheduler.

Every step: running requests first (oldest first: their decode token, or the next chunk of their prompt),
then waiting requests are admitted FCFS while the token budget, the batch size and the free pages allow.
Prefill is chunked to fit the budget. When pages run out, the newest running request is preempted (its
pages freed, its tokens kept) and recomputed later; greedy output is unchanged by that.
A request's sequences (n samples, beams) are scheduled together or not at all.

Under load, admissions are batched (:class:`AdmissionPolicy`): a step that carries any prefill runs uncaptured
and costs several decode steps (on an H100, Llama-8B with 255 decodes + a 300-token prompt: 54 ms wall for 24 ms
of GPU work, vs 12 ms for a decode-only step), so letting each finishing request's successor in on its own turns
a decode-heavy workload into a string of mixed steps. While the batch is nearly full, new requests wait until
enough prompt tokens can start together, for a bounded number of steps.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from autodeploy.errors import CacheCapacityError, ConfigError
from autodeploy.runtime.kv_cache import KVCacheManager
from autodeploy.runtime.request import Request, Sequence, SeqState

log = logging.getLogger(__name__)


@dataclass
class AdmissionPolicy:
    """When to let waiting requests in while the batch is busy.

    Admission is held back only if all of these hold: at least ``busy_fraction`` of ``max_batch_size`` sequences
    (and at least one) are running; this step carries no prefill already; the requests that could start now bring fewer than
    ``min_tokens`` prompt tokens (capped at the step's token budget); the head of the queue was not preempted; and
    admission has been held for fewer than ``max_wait_steps`` steps in a row. ``min_tokens=0`` admits greedily.
    The cost is bounded: at most ``max_wait_steps`` extra steps of queueing for a request, at most
    ``1 - busy_fraction`` of the batch idle meanwhile."""

    # Measured on H100, Llama-8B, 1024 requests (prompts 128-512, outputs 128-512), max batch 256: greedy
    # admission 7,118 output tok/s (353 mixed steps); min_tokens 2048: 7,331; 4096: 9,711 (64 mixed steps;
    # 10,776 in a second pass); 8192: 9,806 (benchmarks/bench_decode.py --cb-only ... --admit-min-tokens N).
    min_tokens: int = 4096
    max_wait_steps: int = 32
    busy_fraction: float = 0.875

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_wait_steps < 0 or not 0.0 <= self.busy_fraction <= 1.0:
            raise ConfigError(f"invalid admission policy {self}: min_tokens and max_wait_steps must be >= 0 and "
                             "busy_fraction in [0, 1]")


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
                 on_preempt: Optional[Callable[[Request], None]] = None,
                 admission: Optional[AdmissionPolicy] = None):
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.admission = admission if admission is not None else AdmissionPolicy()
        self.held_steps = 0  # consecutive steps with admission held back (AdmissionPolicy)
        self.total_held_steps = 0
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
            if total > budget:  # chunk every sequence's prefill to a share of the budget
                share = budget // len(seqs)
                want = [min(s.num_pending, share) for s in seqs]
                total = sum(want)
            if 0 in want:
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
        if self._hold(items, n_seqs, budget):
            return step
        self.held_steps = 0
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

    def _hold(self, items: list[tuple[Sequence, int]], n_seqs: int, budget: int) -> bool:
        """Whether to keep this step decode-only and let the waiting requests in later; a held step is counted."""
        if not self.waiting or not self._hold_admission(items, n_seqs, budget):
            return False
        self.held_steps += 1
        self.total_held_steps += 1
        return True

    def _hold_admission(self, items: list[tuple[Sequence, int]], n_seqs: int, budget: int) -> bool:
        """The AdmissionPolicy decision for a step with ``items`` and ``n_seqs`` running (waiting is non-empty)."""
        policy = self.admission
        if (policy.min_tokens <= 0 or self.held_steps >= policy.max_wait_steps or n_seqs == 0
                or n_seqs < policy.busy_fraction * self.max_batch_size
                or self.waiting[0].metrics.num_preemptions > 0
                or any(n > 1 or seq.num_computed < seq.prompt_len for seq, n in items)):
            return False
        if n_seqs + len(self.waiting[0].live_seqs()) > self.max_batch_size:
            return False  # nobody fits yet: nothing to hold back
        want = min(policy.min_tokens, budget)
        tokens = 0
        for req in self.waiting:
            seqs = req.live_seqs()
            if n_seqs + len(seqs) > self.max_batch_size:
                break
            n_seqs += len(seqs)
            tokens += sum(s.num_pending for s in seqs)
            if tokens >= want:
                return False
        return True

    def hold_admission_for_decode_step(self, n_seqs: int) -> bool:
        """For a decode-only step launched without :meth:`schedule` (the engine's asynchronous path): whether
        admission is held back for it (counted like a held step of :meth:`schedule`)."""
        return self._hold([], n_seqs, self.max_num_tokens - n_seqs)

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
