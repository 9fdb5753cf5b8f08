"""The engine loop: schedule -> nest_sequences (one upload) -> forward -> sample -> stop checks.

Asynchronous scheduling (on by default on a GPU): in steady decode the next step is packed and launched
*before* the host waits for the current step's sampled tokens; the next step's upload takes them from the
sampler's output on the device. Host work (scheduling, packing, stop checks) then overlaps the GPU
instead of adding to every step. Stops are applied one step late: a sequence that sampled EOS has already been
given one more forward, whose token is discarded (its KV write lands in pages it no longer owns, ordered on the
stream before any new owner writes). Requests that need the host between steps (beam search, logits
processors, logprobs, min_tokens) and steps that admit or preempt requests run synchronously. Penalties do not:
their per-sequence token counts live on the device (runtime/penalty_state.py) and the sampling kernel both
reads and updates them.

It owns no model-specific logic and talks to the compiled model only through ``pack``/``forward`` (the
metadata contract) and ``copy_pages`` (copy-on-write). A bad request fails alone with a clear error; the
others keep running. No request is lost: every added request ends finished or with an error.

**Steps are transactional.** A launched step changes no sequence: ``num_computed`` and the KV commit are
applied when the step completes, together with its tokens. Completion runs in two phases: *decide* (append
tokens, run stop hooks; only request/sequence objects change, journaled) and *apply* (KV commits, frees,
scheduler). An interrupt (any BaseException) during *decide* undoes the journal; during *apply* the phase is
finished before the interrupt propagates. After any failure, :meth:`Engine._reconcile` checks every request
against the scheduler and the KV manager and requeues what does not add up (a requeued request recomputes
its KV from its kept tokens; beams restart from the prompt), and frees KV sequences nobody owns. User hooks
that raise, processors that return a wrong shape or non-finite logits, and non-finite model logits fail only
their request (``finish_reason="error"``, ``RequestOutput.error`` naming the hook and its exception). An
exception elsewhere in a step (the forward, say) fails the requests of that step; an interrupt is re-raised
after the engine is consistent again, so the next call is served.

**Finiteness check.** Every step sums each sampled row of logits (one fp32 reduction over ``[rows, V]``) and
sends the ``[rows]`` sums to the host with the tokens (one small asynchronous copy, read after the step's one
wait: no extra synchronisation); a row whose sum is not finite holds a NaN or an inf (a sum of finite logits
cannot overflow fp32 for any real model) and fails its request. Cost per step: that reduction, one
device-to-host copy of ``4 * rows`` bytes, and a ``[rows]`` check on the host.

An Engine has one owner thread: a second thread entering it while the first is inside raises
:class:`~autodeploy.errors.EngineBusyError` instead of corrupting it. Share one engine between threads (or an
asyncio server) through :class:`~autodeploy.runtime.service.EngineService`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from autodeploy.errors import CacheCapacityError, EngineBusyError, InvalidRequestError
from autodeploy.metadata import SequenceChunk
from autodeploy.backends.triton.kernels.argmax import argmax_rows
from autodeploy.backends.triton.kernels.sampling import pack_params, param_row, sample_rows
from autodeploy.runtime.beam_search import BeamSearchState
from autodeploy.runtime.detokenizer import fill_text
from autodeploy.runtime.hooks import StopOnTokens
from autodeploy.runtime.kv_cache import KVCacheManager
from autodeploy.runtime.penalty_state import PenaltyState
from autodeploy.runtime.request import CompletionOutput, Request, RequestOutput, Sequence as Seq, SeqState
from autodeploy.runtime.sampling import SampleOutput, Sampler, SamplingConfig, build_stopping_criteria, draw_seed
from autodeploy.runtime.scheduler import AdmissionPolicy, Scheduler
from autodeploy.runtime.step_buffer import StepHostBuffer, step_host_buffer

log = logging.getLogger(__name__)

MODEL_NON_FINITE = "the model produced non-finite logits (NaN or inf)"


@dataclass
class StepStats:
    """Host-side time per engine step, split by phase (seconds)."""

    schedule: float = 0.0
    pack: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    bookkeeping: float = 0.0
    num_seqs: int = 0
    num_tokens: int = 0

    @property
    def host_overhead(self) -> float:
        return self.schedule + self.pack + self.sample + self.bookkeeping


@dataclass
class _Launched:
    """A forward on the GPU whose sampled tokens the host has not read yet. Nothing of it is applied to the
    sequences before :meth:`Engine._complete`: dropping it leaves every request as it was."""

    items: list[tuple[Seq, int, int]]  # (sequence, new tokens, tokens computed after this step)
    ready: list[tuple[Seq, int]]  # sequences sampling in this step, with their logits row
    plain: list[Seq]  # the non-beam sequences of ``ready``, in the order of ``tokens``
    plain_after: list[int]  # tokens computed after this step, for each of ``plain``
    tokens: Optional[torch.Tensor]  # [len(plain)] for the host (pinned on a GPU)
    device_tokens: Optional[torch.Tensor]  # the sampled tokens on the device: the next step's inputs
    logits: torch.Tensor  # valid until the next forward (CUDA-graph output buffers are reused)
    stats: StepStats
    done: Optional[torch.cuda.Event] = None  # fires when ``tokens`` has reached the host (GPU only)
    # sampler outputs (errors, requested logprobs) and the indices into ``plain`` each one covers
    samples: list[tuple[list[int], SampleOutput]] = field(default_factory=list)
    row_sums: Optional[torch.Tensor] = None  # [len(plain)] fp32 on the host: not finite = non-finite logits


@dataclass
class EngineStats:
    steps: list[StepStats] = field(default_factory=list)
    num_preemptions: int = 0
    num_async_steps: int = 0  # steps launched before the previous step's tokens reached the host
    num_recoveries: int = 0  # steps that failed or were interrupted and were rolled back / reconciled
    num_finished: int = 0
    prompt_tokens: int = 0  # of the requests added
    generation_tokens: int = 0  # tokens appended to sequences (a recomputed request is not counted twice)


class _Journal:
    """What the *decide* phase of a completion changed, so an interrupt can undo it."""

    __slots__ = ("appended", "saved", "beams")

    def __init__(self) -> None:
        self.appended: list[Seq] = []  # sequences that got a token, in order
        self.saved: list[tuple] = []  # request snapshots taken before a rare change (finish, error)
        self.beams: list[Request] = []  # beam requests whose search state advanced: restarted on undo

    def save(self, req: Request) -> None:
        self.saved.append((req, req.error, list(req.seqs),
                           [(s, s.state, s.finish_reason) for s in req.seqs], req.metrics.finished))

    def undo(self, engine: "Engine") -> None:
        for req, error, seqs, states, finished in reversed(self.saved):
            req.error, req.seqs, req.metrics.finished = error, seqs, finished
            for s, state, reason in states:
                s.state, s.finish_reason = state, reason
        for s in reversed(self.appended):
            s.token_ids.pop()
            if s.logprobs is not None and len(s.logprobs) > len(s.token_ids) - s.prompt_len:
                entry = s.logprobs.pop()
                s.cumulative_logprob -= next(iter(entry.values()))
            req = s.request
            req.metrics.num_generated = max(len(x.token_ids) - x.prompt_len for x in req.seqs)
            if req.new_tokens:
                req.new_tokens.pop()
        for req in self.beams:
            engine._requeue(req)


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now (the model, its graphs and kernels, the imported libraries:
    hundreds of thousands of objects) out of the collector's reach, as serving engines do: a full collection
    mid-serving would scan them all and stall a step. Frozen objects are still freed by reference counting, but
    reference cycles among them that die later (a dropped compiled model, its KV cache with it) never are: so
    only a process that serves one model for its lifetime does this (``autodeploy serve``, ``autodeploy
    bench``, ``Engine(freeze_gc=True)``), never an engine a library call makes and drops."""
    gc.collect()
    gc.freeze()


class Engine:
    """In-flight batching over a :class:`~autodeploy.runtime.compiled_model.CompiledModel`."""

    def __init__(self, cm: Any, logits_processors: Sequence[Any] = (), stopping_criteria: Sequence[Any] = (),
                 tokenizer: Any = None, max_batch_size: Optional[int] = None,
                 max_num_tokens: Optional[int] = None, record_stats: bool = False,
                 async_scheduling: Optional[bool] = None, admission: Optional[AdmissionPolicy] = None,
                 freeze_gc: bool = False):
        self.cm = cm
        if freeze_gc:  # see freeze_startup_objects
            freeze_startup_objects()
        self.gc_frozen = bool(freeze_gc)
        # Overlapping host and GPU only pays where the forward is asynchronous; forcing it on CPU tests it.
        self.async_scheduling = cm.device.type == "cuda" if async_scheduling is None else bool(async_scheduling)
        self._inflight: Optional[_Launched] = None
        # a stateful model's sequences also hold a recurrent-state slot (runtime/state_slots.py)
        state_slots = cm.new_state_slots() if hasattr(cm, "new_state_slots") else None
        self.kv = KVCacheManager(cm.num_pages, cm.page_size, enable_prefix_caching=cm.enable_prefix_caching,
                                 state_slots=state_slots)
        self.scheduler = Scheduler(self.kv, max_batch_size or cm.max_batch_size,
                                   max_num_tokens or cm.max_num_tokens, on_preempt=self._on_preempt,
                                   admission=admission)
        self.sampler = Sampler()
        self.global_processors = list(logits_processors)
        self.global_stopping = list(stopping_criteria)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(cm.info, "tokenizer", None)
        self.eos_token_ids = list(cm.info.eos_token_ids)
        self.requests: dict[Any, Request] = {}  # requests added and not finished yet
        self.stats = EngineStats()
        self.record_stats = record_stats
        self._next_id = 0
        self._owner = threading.RLock()
        self._unreported: dict[int, Request] = {}  # touched by completed work, not yet returned by step()
        self._step_items: list[list] = []  # item lists launched or completed by the step being run
        self._stalled = 0
        self.service: Any = None  # the EngineService that owns this engine, if any
        self._penalties: Optional[PenaltyState] = None  # allocated with the first penalized device-sampled step

    # -- ownership -----------------------------------------------------------------------------------------
    def _enter(self) -> None:
        if not self._owner.acquire(blocking=False):
            raise EngineBusyError("this Engine is already being driven by another thread; an Engine has one owner "
                                  "thread (share it through autodeploy.runtime.service.EngineService)")

    # -- submission ---------------------------------------------------------------------------------------
    def validate(self, prompt_ids: Any, sampling: SamplingConfig) -> list[int]:
        """Check a request before it touches any shared state; raise InvalidRequestError naming the cause.
        Reads only immutable engine settings, so any thread may call it."""
        if not isinstance(sampling, SamplingConfig):
            raise InvalidRequestError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        sampling.validate(self.cm.vocab_size)
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        if prompt_ids is None or isinstance(prompt_ids, (str, bytes, dict)) or not hasattr(prompt_ids, "__iter__"):
            raise InvalidRequestError(f"a prompt must be a list of token ids, got {type(prompt_ids).__name__}")
        ids = list(prompt_ids)
        if not ids:
            raise InvalidRequestError("empty prompt: a prompt needs at least one token")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            raise InvalidRequestError(f"token ids must be ints, got {type(bad[0]).__name__} ({bad[0]!r})")
        out_of_vocab = [t for t in ids if not 0 <= t < self.cm.vocab_size]
        if out_of_vocab:
            raise InvalidRequestError(
                f"token id {out_of_vocab[0]} is outside the vocabulary [0, {self.cm.vocab_size})")
        if len(ids) >= self.cm.max_seq_len:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens does not fit max_seq_len={self.cm.max_seq_len} "
                "(it needs room for at least one generated token)")
        width = max(sampling.n, sampling.beam_width)
        if width > 1 and self.kv.state_slots is not None:
            raise InvalidRequestError(f"n/beam_width={width}: a stateful model (recurrent mixer layers) runs one "
                                      "sequence per request (forking would need a copy of its recurrent state)")
        if width > self.scheduler.max_batch_size:
            raise InvalidRequestError(f"n/beam_width={width} exceeds max_batch_size={self.scheduler.max_batch_size}")
        pages_alone = width * self.kv.pages_needed(min(self.cm.max_seq_len, len(ids) + sampling.max_new_tokens))
        if self.kv.pages_needed(len(ids)) * width > self.kv.num_pages:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens x {width} sequences needs more KV pages than the cache has "
                f"({self.kv.num_pages}); requested total {pages_alone}")
        return ids

    def add_request(self, prompt_ids: Any, sampling: Optional[SamplingConfig] = None,
                    request_id: Any = None) -> Request:
        sampling = sampling or SamplingConfig()
        ids = self.validate(prompt_ids, sampling)
        self._enter()
        try:
            if request_id is None:
                request_id, self._next_id = self._next_id, self._next_id + 1
            if request_id in self.requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            if self.global_processors:
                sampling = _with(sampling, logits_processors=list(sampling.logits_processors) + self.global_processors)
            req = Request(request_id, ids, sampling)
            req.plain_greedy = sampling.is_greedy and not sampling.needs_host_sampling and not sampling.needs_penalties
            req.device_sampling = not sampling.needs_host_sampling and not sampling.is_beam_search
            req.metrics.num_prompt_tokens = len(ids)
            detok = self.tokenizer.decode if self.tokenizer is not None else None
            checkers = build_stopping_criteria(sampling, self.eos_token_ids, len(ids), detok) + self.global_stopping
            req.stop_ids = frozenset().union(*(c.ids for c in checkers if isinstance(c, StopOnTokens)))
            req.stop_checkers = [c for c in checkers if not isinstance(c, StopOnTokens)]
            self._init_seqs(req)
            self.requests[request_id] = req
            self.scheduler.add(req)
            self.stats.prompt_tokens += len(ids)
            return req
        finally:
            self._owner.release()

    def _init_seqs(self, req: Request) -> None:
        cfg = req.sampling
        if cfg.is_beam_search:
            req.beam = BeamSearchState.from_config(cfg, eos_token_ids=[] if cfg.ignore_eos else self.eos_token_ids)
            req.seqs = [Seq(req, list(req.prompt_ids), len(req.prompt_ids))]
            return
        req.seqs = []
        for i in range(cfg.n):
            # one Philox stream per sample, drawn once here (a preempted request keeps its sequences, so its seed)
            seed = (cfg.seed + i) % 2**64 if cfg.seed is not None else draw_seed() if cfg.temperature > 0 else 0
            req.seqs.append(Seq(req, list(req.prompt_ids), len(req.prompt_ids), seed=seed,
                                sample_params=param_row(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, seed,
                                                        repetition_penalty=cfg.repetition_penalty,
                                                        frequency_penalty=cfg.frequency_penalty,
                                                        presence_penalty=cfg.presence_penalty),
                                logprobs=[] if cfg.logprobs is not None else None))

    def _on_preempt(self, req: Request) -> None:
        self.stats.num_preemptions += 1
        if self._penalties is not None:  # recomputed from its tokens, its penalty row is rebuilt from them too
            self._penalties.release(req.seqs)
        if req.beam is not None:  # beams restart from the prompt: recomputation reproduces them exactly
            self._init_seqs(req)

    def abort(self, request_id: Any) -> Optional[Request]:
        """End a request now (``finish_reason="abort"``) and free its pages; idempotent. Returns the request,
        or None for an unknown (or already finished) id. A step in flight discards its token."""
        self._enter()
        try:
            req = self.requests.get(request_id)
            if req is None:
                return None
            for s in req.seqs:
                if s.state is not SeqState.FINISHED:
                    s.state, s.finish_reason = SeqState.FINISHED, "abort"
            self._finish(req)
            self._unreported.pop(id(req), None)
            return req
        finally:
            self._owner.release()

    # -- the loop ------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work() or bool(self._unreported)

    def step(self) -> list[Request]:
        """Advance by one forward; return the requests that produced tokens or finished.

        With a step in flight, the next decode step is launched first (when possible) and then the in-flight
        step's tokens are read and applied; otherwise this schedules, launches and (unless it can stay in
        flight) completes a step synchronously. Transactional: see the module docstring.
        """
        self._enter()
        try:
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001 - every failure leaves a consistent engine
                self._recover(exc)
                if not isinstance(exc, Exception) or not self._fail_step(exc):
                    raise
            touched, self._unreported = list(self._unreported.values()), {}
            return touched
        finally:
            self._step_items = []
            self._owner.release()

    def _step(self) -> None:
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._step_items.append(prev.items)
            try:
                self._inflight = self._launch_ahead(prev)
            except BaseException:
                self._inflight = None
                try:  # prev's tokens are good: keep them, then report the failure
                    self._complete(prev)
                except BaseException:  # noqa: BLE001 - the first failure is the one to report
                    log.exception("completing a step after its successor failed")
                raise
            try:
                self._complete(prev)
            except BaseException:
                self._inflight = None  # launched on tokens that were just rolled back
                raise
            return
        st = StepStats()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        for req, why in sched.rejected:
            self._fail(req, why)
        for req in sched.truncated:  # outgrew the whole KV cache: end it gracefully, keeping its tokens
            log.warning("request %s stopped: the KV cache cannot hold it any longer", req.request_id)
            for s in req.live_seqs():
                s.state, s.finish_reason = SeqState.FINISHED, "kv_cache_full"
            if req.beam is not None:
                req.seqs = [Seq(req, req.prompt_ids + toks, len(req.prompt_ids), state=SeqState.FINISHED,
                                finish_reason="kv_cache_full") for toks in req.beam.finalize(max(1, req.sampling.n))]
            self._finish(req)
        if not sched.items:
            self._no_progress(sched)
            return
        self._stalled = 0
        chunks = [SequenceChunk(s.token_ids[s.num_computed:s.num_computed + n], s.num_computed,
                                self.kv.pages_view(s.seq_id), want_logits=s.num_computed + n == len(s.token_ids),
                                state_slot=self.kv.state_slot(s.seq_id, s.num_computed, n))
                  for s, n in sched.items]
        st.schedule = time.perf_counter() - t0
        launched = self._launch([(s, s.num_computed, n) for s, n in sched.items], chunks, st)
        if self.async_scheduling and launched.device_tokens is not None \
                and all(_async_ok(s) for s, _ in launched.ready):
            self._inflight = launched  # read its tokens next step, after launching the one after it
            return
        self._complete(launched)

    def _no_progress(self, sched: Any) -> None:
        """Nothing was scheduled. Fail what can never run instead of spinning."""
        if not self.scheduler.has_work() or sched.rejected:
            return
        if not self.scheduler.running:
            # Nothing can run and nothing holds pages: waiting requests can never fit.
            self._fail(self.scheduler.waiting[0], "the KV cache cannot hold this request")
            return
        self._stalled += 1
        if self._stalled == 1:
            self._reconcile()  # running requests with nothing to compute: requeue them
            return
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._fail(req, "internal error: the engine could not schedule this request (no progress)")

    def _launch(self, items: list[tuple[Seq, int, int]], chunks: list[SequenceChunk], st: StepStats,
                token_src: Optional[torch.Tensor] = None) -> _Launched:
        """Pack, run the forward and sample on the device; nothing here waits for the GPU, and nothing here
        changes a sequence (``items``: (sequence, tokens computed before, new tokens)).

        ``token_src``: the device tensor holding this step's input tokens (one per chunk, async decode); the
        packed ``input_ids`` then hold placeholders and are overwritten on the device.
        """
        t0 = time.perf_counter()
        self._step_items.append(items)  # blamed if this step fails outside user hooks
        copies = self.kv.peek_pending_copies()
        if copies:  # taken only once applied: an interrupted copy is applied again next step
            self.cm.copy_pages(copies)
            self.kv.take_pending_copies()
        # token_src: the upload takes the input tokens from the device (one-token chunks keep their order)
        batch = self.cm.pack(chunks, token_src=token_src)
        t1 = time.perf_counter()
        logits = self.cm.forward(batch)  # asynchronous on a GPU
        t2 = time.perf_counter()
        done_items = [(s, n, start + n) for s, start, n in items]
        rows = {batch.logits_rows[i]: i for i in range(len(batch.logits_rows))}
        ready = [(s, rows[i]) for i, (s, _, _) in enumerate(items) if i in rows]
        plain_rows, plain_after = [], []
        for i, (s, start, n) in enumerate(items):
            if i in rows and s.request.beam is None:
                plain_rows.append((s, rows[i]))
                plain_after.append(start + n)
        plain = [s for s, _ in plain_rows]
        # On a GPU the tokens start their trip to the host now (into pinned memory): a plain .tolist() later
        # would queue behind (and wait for) the next step's forward, serialising the very overlap
        # asynchronous scheduling is for.
        # one pinned buffer (runtime/step_buffer.py): the tokens, the rows' logit sums (fp32) of the finiteness
        # check and the fused sampler's per-row parameters (read by the kernel through the mapped address)
        host = step_host_buffer(len(plain_rows)) if plain_rows and logits.is_cuda else None
        tokens = device_tokens = row_sums = None
        samples: list[tuple[list[int], SampleOutput]] = []
        if plain_rows:
            device_tokens, tokens, samples, row_sums = self._sample(plain_rows, logits, host, plain_after)
        done = None
        if host is not None:
            done = torch.cuda.Event()
            done.record()
        st.pack, st.forward, st.sample = t1 - t0, t2 - t1, time.perf_counter() - t2
        st.num_seqs, st.num_tokens = len(items), sum(n for _, _, n in items)
        return _Launched(done_items, ready, plain, plain_after, tokens, device_tokens, logits, st, done, samples,
                         row_sums)

    def _launch_ahead(self, prev: _Launched) -> Optional[_Launched]:
        """Launch the decode step that follows ``prev`` before ``prev``'s tokens are known, or return None
        when the next step needs the scheduler (admissions, preemption, prefill) or a sequence the host must
        see first."""
        t0 = time.perf_counter()
        sched = self.scheduler
        alive = [(i, s) for i, s in enumerate(prev.plain) if s.state is not SeqState.FINISHED]
        n_running = sum(len(r.live_seqs()) for r in sched.running)
        if n_running != len(alive):
            return None  # someone is still prefilling, or prev did not sample every running sequence
        if sched.waiting and n_running < sched.max_batch_size and not sched.hold_admission_for_decode_step(n_running):
            return None  # a waiting request may fit: let the scheduler admit it
        after = prev.plain_after
        src_rows, seqs, starts = [], [], []
        max_seq_len = self.cm.max_seq_len
        for i, s in alive:
            n_out = len(s.token_ids) + 1 - s.prompt_len  # after prev's token is appended
            if n_out >= s.request.sampling.max_new_tokens or len(s.token_ids) + 1 >= max_seq_len:
                continue  # finishes at prev for certain: no further step
            seqs.append(s)
            src_rows.append(i)
            starts.append(after[i])
        if not seqs:
            return None
        pen = self._penalties
        if any(s.request.sampling.needs_penalties and (pen is None or not pen.in_sync(s, start + 1))
               for s, start in zip(seqs, starts)):
            return None  # a penalty row to rebuild needs the context on the host: a synchronous step
        kv = self.kv
        try:
            if not all(kv.ensure_slots(s.seq_id, start + 1) for s, start in zip(seqs, starts)):
                return None  # out of pages: the scheduler preempts next step
        except CacheCapacityError:
            return None
        chunks = [SequenceChunk((0,), start, kv.pages_view(s.seq_id), state_slot=kv.state_slot(s.seq_id, start, 1))
                  for s, start in zip(seqs, starts)]
        dev = prev.device_tokens
        src = dev if len(seqs) == len(prev.plain) else dev[torch.tensor(src_rows, device=dev.device)]
        st = StepStats(schedule=time.perf_counter() - t0)
        self.stats.num_async_steps += 1
        return self._launch([(s, start, 1) for s, start in zip(seqs, starts)], chunks, st, token_src=src)

    def _complete(self, launched: _Launched) -> None:
        """Read a launched step's tokens (the one wait for the GPU) and apply them: *decide* (tokens, stop hooks;
        journaled, undone on an interrupt), then *apply* (KV commits, frees, scheduler; finished even when
        interrupted)."""
        st = launched.stats
        t0 = time.perf_counter()
        kv = self.kv
        live_items = [(s, c) for s, _n, c in launched.items if s.state is not SeqState.FINISHED and s.seq_id in kv]
        t1 = time.perf_counter()
        wait = 0.0
        touched: dict[int, Request] = {}
        journal = _Journal()
        try:
            if launched.plain:
                if launched.done is not None:
                    launched.done.synchronize()  # the one wait for the GPU (attributed to the forward)
                    wait = time.perf_counter() - t1
                errors, logprobs = self._read_samples(launched)
                sums = launched.row_sums.tolist()
                total = sum(sums)  # a Python float: finite exactly when every row's sum is
                if total - total != 0.0:
                    for i, v in enumerate(sums):
                        if v - v != 0.0:
                            errors[i] = f"{MODEL_NON_FINITE} at output token {len(launched.plain[i].output_ids)}"
                for i, (s, tok) in enumerate(zip(launched.plain, launched.tokens.tolist())):
                    if s.state is SeqState.FINISHED:
                        continue  # stopped one step earlier (asynchronous scheduling), or aborted
                    req = s.request
                    touched[id(req)] = req
                    if i in errors:
                        self._fail_decided(req, errors[i], journal)
                    else:
                        self._append(s, tok, logprobs.get(i) if logprobs else None, journal)
            beams: dict[int, list[tuple[Seq, int]]] = {}
            for s, r in launched.ready:
                if s.request.beam is not None and s.state is not SeqState.FINISHED:
                    beams.setdefault(id(s.request), []).append((s, r))
            beam_choices = []
            for group in beams.values():
                req = group[0][0].request
                if len(group) != len(req.live_seqs()):
                    continue  # some beams still prefilling (cannot happen: beams decode in lockstep)
                touched[id(req)] = req
                beam_choices.append((req, group, self._beam_decide(req, group, launched.logits, journal)))
        except BaseException:
            journal.undo(self)
            raise
        self.stats.generation_tokens += len(journal.appended)
        # apply: every operation runs even if an earlier one is interrupted; the first failure is re-raised
        failure: Optional[BaseException] = None
        for s, computed in live_items:
            try:
                s.num_computed = computed
                kv.commit(s.seq_id, s.token_ids, computed)
            except BaseException as exc:  # noqa: BLE001
                failure = failure or exc
        for req, group, choices in beam_choices:
            try:
                if choices is not None:
                    self._beam_apply(req, group, choices)
            except BaseException as exc:  # noqa: BLE001
                failure = failure or exc
        now = time.perf_counter()
        for req in touched.values():
            try:
                if req.metrics.first_token is None:
                    req.metrics.first_token = now
                if req.finished:
                    self._finish(req)
                elif len(req.seqs) > 1:  # a sample that finished while its siblings go on
                    for s in req.seqs:
                        if s.state is SeqState.FINISHED and s.seq_id in kv:
                            kv.free(s.seq_id)
            except BaseException as exc:  # noqa: BLE001
                failure = failure or exc
        self._unreported.update(touched)
        if self.record_stats:
            st.forward += wait
            st.sample += now - t1 - wait
            st.bookkeeping = t1 - t0
            self.stats.steps.append(st)
        if failure is not None:
            raise failure

    # -- sampling ------------------------------------------------------------------------------------------
    def _sample(self, plain: list[tuple[Seq, int]], logits: torch.Tensor, buf: Optional[StepHostBuffer],
                after: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[list[int], SampleOutput]],
                                           torch.Tensor]:
        """Next token of every non-beam sequence on the device (no host synchronisation): returns the device
        tokens (the next step's inputs), the tokens for the host (``buf.tokens`` when given, filled
        asynchronously: the greedy and sampling kernels write it themselves, saving a copy-engine trip), the
        sampler outputs (errors, requested logprobs) and the rows' logit sums for the finiteness check (on their
        way to the host).
        ``after[i]``: tokens computed after this step, so the token drawn is generated token
        ``after[i] - prompt_len`` (the Philox counter of its draws).

        Batches whose requests need no host work (no processors, logprobs, min_tokens) sample in one fused
        launch, greedy and penalized rows included (penalties from the device state, ``self._penalties``); any
        other batch goes through :class:`Sampler` (host-built tensors, a host sync only where a Python processor
        reads its row), whose sampled rows draw the same Philox stream and penalize the same way."""
        rows = [r for _, r in plain]
        picked = logits[:len(rows)] if rows == list(range(len(rows))) else \
            logits.index_select(0, torch.tensor(rows, device=logits.device))
        n = len(rows)
        # the step's one finiteness check: each row's fp32 sum, written by the token kernels in the same pass
        prm_buf = host = None
        if buf is not None:
            host, sums, prm_buf = buf.tokens, buf.row_sums, buf.params
        else:
            sums = torch.empty((n,), dtype=torch.float32, device=picked.device)
        samples: list[tuple[list[int], SampleOutput]] = []
        if all(s.request.plain_greedy for s, _ in plain):  # hot path: one argmax
            tokens = argmax_rows(picked, host_out=host, row_sums=sums)
            return tokens, (host if host is not None else tokens), samples, sums
        seqs = [s for s, _ in plain]
        steps = [a - s.prompt_len for s, a in zip(seqs, after)]
        penalized = [s.request.sampling.needs_penalties for s in seqs]
        if all(s.request.device_sampling for s in seqs):  # one fused launch, parameters read from pinned memory
            pen_rows = state = None
            if any(penalized):  # the counts live on the device; the kernel reads and updates them
                pen = self._penalty_state(picked)
                pen_rows = pen.assign(seqs, after, penalized)
                state = pen.tensor
            elif self._penalties is not None:
                self._penalties.release_if_idle()
            prm = pack_params([s.sample_params for s in seqs], steps, out=prm_buf, pen_rows=pen_rows)
            tokens = sample_rows(picked, prm, host_out=host, row_sums=sums, penalties=state)
            return tokens, (host if host is not None else tokens), samples, sums
        if self._penalties is not None and any(penalized):
            self._penalties.invalidate(seqs)  # the host path penalizes from token_ids; their rows miss this token
        sums.copy_(torch.sum(picked, dim=-1, dtype=torch.float32), non_blocking=True)  # before processors run
        try:
            out = self._sample_rows(picked, seqs, steps)
            samples.append((list(range(len(seqs))), out))
            tokens = out.tokens
        except Exception as exc:  # noqa: BLE001 - not a hook (those are isolated): find the failing rows
            log.warning("batched sampling failed (%s: %s); sampling each row alone", type(exc).__name__, exc)
            parts = []
            for i, s in enumerate(seqs):
                try:
                    out = self._sample_rows(picked[i:i + 1], [s], steps[i:i + 1])
                except Exception as row_exc:  # noqa: BLE001
                    out = SampleOutput(tokens=torch.zeros(1, dtype=torch.long, device=picked.device),
                                       errors={0: f"sampling failed: {type(row_exc).__name__}: {row_exc}"})
                samples.append(([i], out))
                parts.append(out.tokens)
            tokens = torch.cat(parts)
        if host is None:
            return tokens, tokens, samples, sums
        host.copy_(tokens, non_blocking=True)
        return tokens, host, samples, sums

    def _penalty_state(self, logits: torch.Tensor) -> PenaltyState:
        """The device penalty state, created on first use (a sequence's counts never exceed max_seq_len)."""
        pen = self._penalties
        if pen is None or pen.vocab_size != logits.shape[1] or pen.device != logits.device:
            pen = self._penalties = PenaltyState(logits.shape[1], logits.device, max_count=self.cm.max_seq_len)
        return pen

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Seq], steps: list[int]) -> SampleOutput:
        cfgs = [s.request.sampling for s in seqs]
        suppress = [s.request.stop_ids if len(s.token_ids) - s.prompt_len < c.min_tokens else None
                    for s, c in zip(seqs, cfgs)]
        return self.sampler.sample(
            logits, cfgs, [s.token_ids for s in seqs], [s.prompt_len for s in seqs],
            return_logprobs=False, suppress_ids=suppress, want_logprobs=[c.logprobs for c in cfgs],
            isolate_errors=True, streams=[(s.seed or 0, st) for s, st in zip(seqs, steps)])

    @staticmethod
    def _read_samples(launched: _Launched) -> tuple[dict[int, str], dict[int, tuple[float, Optional[dict]]]]:
        """Sampler errors and requested logprobs of a completed step, by index into ``launched.plain``."""
        errors: dict[int, str] = {}
        logprobs: dict[int, tuple[float, Optional[dict]]] = {}
        for idxs, out in launched.samples:
            for r, msg in out.errors.items():
                errors[idxs[r]] = msg
            if out.token_logprobs is None:
                continue
            lps = out.token_logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for j, r in enumerate(out.logprob_rows):
                s = launched.plain[idxs[r]]
                n = s.request.sampling.logprobs or 0
                top = dict(zip(top_ids[j][:n], top_lps[j][:n])) if n and top_ids is not None else None
                logprobs[idxs[r]] = (lps[j], top)
        return errors, logprobs

    # -- completion ----------------------------------------------------------------------------------------
    def _append(self, s: Seq, tok: int, lp: Optional[tuple[float, Optional[dict]]], journal: _Journal) -> None:
        req = s.request
        tokens = s.token_ids
        journal.appended.append(s)
        tokens.append(tok)
        n_out = len(tokens) - s.prompt_len
        metrics = req.metrics
        if n_out > metrics.num_generated:
            metrics.num_generated = n_out
        if lp is not None and s.logprobs is not None:
            entry = {tok: lp[0]}
            if lp[1]:
                entry.update((t, v) for t, v in lp[1].items() if t != tok)
            s.logprobs.append(entry)
            s.cumulative_logprob += lp[0]
        req.new_tokens.append((0 if len(req.seqs) == 1 else req.seqs.index(s), tok, lp))
        cfg = req.sampling
        reason = None
        if n_out >= cfg.min_tokens:
            if tok in req.stop_ids:
                reason = "stop"
            elif req.stop_checkers:
                for check in req.stop_checkers:
                    try:
                        hit = check(tokens, tok)
                    except Exception as exc:  # noqa: BLE001 - user code fails its own request only
                        self._fail_decided(req, f"stopping criteria {type(check).__name__} raised "
                                                f"{type(exc).__name__}: {exc}", journal)
                        return
                    if hit:
                        reason = "stop"
                        break
        if reason is None:
            if n_out >= cfg.max_new_tokens:
                reason = "length"
            elif len(tokens) >= self.cm.max_seq_len:
                reason = "max_seq_len"
        if reason is not None:
            journal.save(req)
            s.state, s.finish_reason = SeqState.FINISHED, reason

    def _fail_decided(self, req: Request, why: str, journal: _Journal) -> None:
        """Mark ``req`` failed inside a completion's decide phase (its pages are freed by the apply phase)."""
        journal.save(req)
        req.error = why
        for s in req.seqs:
            s.state, s.finish_reason = SeqState.FINISHED, "error"
        log.warning("request %s failed: %s", req.request_id, why)

    def _beam_decide(self, req: Request, group: list[tuple[Seq, int]], logits: torch.Tensor,
                     journal: _Journal) -> Optional[list[tuple[int, int]]]:
        """Advance the beam search state; None when the request failed instead."""
        idx = torch.tensor([r for _, r in group], device=logits.device)
        rows = logits.index_select(0, idx).float()
        logprobs = torch.log_softmax(rows, dim=-1)  # stays on the device: BeamSearchState.step copies 2k values
        if not bool(torch.isfinite(rows).all()):
            self._fail_decided(req, f"{MODEL_NON_FINITE} at output token {req.metrics.num_generated}", journal)
            return None
        journal.beams.append(req)  # the search state changes below: an undo restarts the request
        return req.beam.step(logprobs)

    def _beam_apply(self, req: Request, group: list[tuple[Seq, int]], choices: list[tuple[int, int]]) -> None:
        seqs = [s for s, _ in group]
        new_seqs: list[Seq] = []
        for parent_idx, tok in choices:
            parent = seqs[parent_idx]
            child = Seq(req, parent.token_ids + [tok], parent.prompt_len, num_computed=parent.num_computed,
                        state=SeqState.RUNNING)
            self.kv.fork(parent.seq_id, child.seq_id)
            new_seqs.append(child)
        for s in seqs:
            self.kv.free(s.seq_id)
            s.state = SeqState.FINISHED
        req.metrics.num_generated += 1
        if req.beam.is_done or not new_seqs:
            for s in new_seqs:
                self.kv.free(s.seq_id)
                s.state = SeqState.FINISHED
            req.seqs = [Seq(req, req.prompt_ids + toks, len(req.prompt_ids), state=SeqState.FINISHED,
                            finish_reason="stop")
                        for toks in req.beam.finalize(max(1, req.sampling.n))]
            return
        req.seqs = new_seqs

    def _finish(self, req: Request) -> None:
        """Retire a finished (or failed, or aborted) request: free its pages, leave the scheduler, report it."""
        if req.metrics.finished is None:
            req.metrics.finished = time.perf_counter()
        self.scheduler.finish(req)
        if self.requests.get(req.request_id) is req:
            del self.requests[req.request_id]
            self.stats.num_finished += 1
        self._unreported[id(req)] = req

    def _fail(self, req: Request, why: str) -> None:
        req.error = why
        for s in req.seqs:
            s.state = SeqState.FINISHED
            s.finish_reason = "error"
        self._finish(req)
        log.warning("request %s failed: %s", req.request_id, why)

    # -- recovery ------------------------------------------------------------------------------------------
    def _recover(self, exc: BaseException) -> None:
        """After a failed or interrupted step: drop the step in flight and make every structure agree."""
        self.stats.num_recoveries += 1
        self._inflight = None
        if self._penalties is not None:  # rolled-back tokens may be counted: rebuild every row from its tokens
            self._penalties.invalidate()
        log.warning("engine step %s (%s: %s); reconciling", "interrupted" if not isinstance(exc, Exception)
                    else "failed", type(exc).__name__, exc)
        self._reconcile()

    def _fail_step(self, exc: Exception) -> bool:
        """An exception outside user hooks: fail the requests of the failed step. False when no request can
        be blamed (the error is then re-raised to the caller)."""
        reqs = {id(it[0].request): it[0].request for items in self._step_items for it in items
                if self.requests.get(it[0].request.request_id) is it[0].request}
        if not reqs:
            return False
        why = f"engine step failed: {type(exc).__name__}: {exc}"
        log.error("%s (failing %d request(s))", why, len(reqs), exc_info=exc)
        for req in reqs.values():
            self._fail(req, why)
        return True

    def _reconcile(self) -> None:
        """Bring scheduler, sequences and KV manager into agreement, whatever was interrupted where.

        Finished requests are retired; an unfinished request must be in exactly one scheduler queue, and if
        running every live sequence must own KV whose written length equals its ``num_computed``, with a token
        left to compute. Requests that break this are requeued (KV freed, recomputed later from their kept
        tokens; beams restart). KV sequences no live request owns are freed. O(requests + sequences)."""
        sched, kv = self.scheduler, self.kv
        for req in list(self.requests.values()):
            if req.finished:
                self._finish(req)
                continue
            if not self._consistent(req):
                log.info("request %s requeued after a failed step", req.request_id)
                self._requeue(req)
        owned = {s.seq_id for req in self.requests.values() for s in req.live_seqs()}
        for sid in kv.seq_ids():
            if sid not in owned:
                kv.free(sid)
        live = {id(r) for r in self.requests.values()}
        seen: set[int] = set()
        sched.running = [r for r in sched.running if id(r) in live and not (id(r) in seen or seen.add(id(r)))]
        waiting = [r for r in sched.waiting if id(r) in live and not (id(r) in seen or seen.add(id(r)))]
        sched.waiting.clear()
        sched.waiting.extend(waiting)

    def _consistent(self, req: Request) -> bool:
        sched, kv = self.scheduler, self.kv
        n_run = sum(1 for r in sched.running if r is req)
        n_wait = sum(1 for r in sched.waiting if r is req)
        live = req.live_seqs()
        if n_run + n_wait != 1 or not live:
            return False
        if n_wait:
            return all(s.state is SeqState.WAITING and s.seq_id not in kv and s.num_computed == 0 for s in live)
        return all(s.state is SeqState.RUNNING and s.seq_id in kv and kv.num_computed(s.seq_id) == s.num_computed
                   and kv.state_matches(s.seq_id, s.num_computed)
                   and s.num_pending > 0 and kv.num_pages_of(s.seq_id) * kv.page_size >= s.num_computed
                   for s in live)

    def _requeue(self, req: Request) -> None:
        """Back to the waiting queue in arrival order with no KV (like a preemption, not counted as one)."""
        sched, kv = self.scheduler, self.kv
        for s in req.seqs:
            if s.seq_id in kv:
                kv.free(s.seq_id)
        sched.running = [r for r in sched.running if r is not req]
        waiting = [r for r in sched.waiting if r is not req]
        if req.beam is not None:
            self._init_seqs(req)
        for s in req.live_seqs():
            s.num_computed, s.state = 0, SeqState.WAITING
        pos = 0
        while pos < len(waiting) and waiting[pos].order < req.order:
            pos += 1
        waiting.insert(pos, req)
        sched.waiting.clear()
        sched.waiting.extend(waiting)

    # -- convenience ---------------------------------------------------------------------------------------
    def output(self, req: Request) -> RequestOutput:
        samples = [s.output_ids for s in req.seqs]
        outputs = [CompletionOutput(index=i, token_ids=list(s.output_ids), logprobs=s.logprobs,
                                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                    finish_reason=s.finish_reason)
                   for i, s in enumerate(req.seqs)]
        out = RequestOutput(request_id=req.request_id, prompt_ids=req.prompt_ids,
                            output_ids=samples[0] if samples else [], samples=samples,
                            finish_reason=req.seqs[0].finish_reason if req.seqs else None,
                            metrics=req.metrics, error=req.error, outputs=outputs)
        # the one text rule (runtime/detokenizer.py): what a stream of this request shows, concatenated
        return fill_text(out, self.tokenizer, req.sampling.stop_strings)

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: Sequence[Any], sampling: Any = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion. ``sampling``: one config for all, or one per prompt.
        Invalid requests raise before any work starts. Interrupted (KeyboardInterrupt, ...), the call aborts
        its own requests, leaves the engine consistent and re-raises."""
        if prompts is None or isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise InvalidRequestError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
        configs = per_prompt_configs(sampling, len(prompts))
        for p, c in zip(prompts, configs):
            self.validate(p, c)
        reqs: list[Request] = []
        try:
            for p, c in zip(prompts, configs):
                reqs.append(self.add_request(p, c))
            self.run_until_done()
        except BaseException:
            for r in reqs:
                if self.requests.get(r.request_id) is r:
                    self.abort(r.request_id)
            raise
        return [self.output(r) for r in reqs]

    def stream(self) -> Iterator[tuple[Request, int, int, bool]]:
        """Yield ``(request, sample index, token, request_done)`` as tokens are produced until no work is left.
        Beam search yields its final best sequence when it finishes (beams are not final before that).
        A request that ends without a new token (error, abort) yields ``token = -1``."""
        while self.has_work():
            for req in self.step():
                for i, tok, _lp, done in drain_events(req):
                    yield req, i, tok, done


def drain_events(req: Request) -> list[tuple[int, int, Optional[tuple[float, Optional[dict]]], bool]]:
    """Take the tokens ``req`` produced since the last call: ``(sample index, token, (logprob, top) or None,
    request_done)``; the last one of a finished request has ``request_done``; one with no token has -1."""
    new, req.new_tokens = req.new_tokens, []
    finished = req.finished
    if req.beam is not None:
        if not finished:
            return []
        new = [(0, t, None) for t in (req.seqs[0].output_ids if req.seqs and req.error is None else [])]
    if finished and not new:
        return [(0, -1, None, True)]
    return [(i, tok, lp, finished and j == len(new) - 1) for j, (i, tok, lp) in enumerate(new)]


def _async_ok(s: Seq) -> bool:
    """Can this sequence's next step be launched before its last token reaches the host?"""
    return s.request.beam is None and not s.request.sampling.needs_host_sampling


def per_prompt_configs(sampling: Any, n: int, default: Optional[SamplingConfig] = None) -> list[SamplingConfig]:
    """One config for all prompts, one per prompt, or ``default`` (a fresh SamplingConfig) when None."""
    if sampling is None:
        return [default or SamplingConfig() for _ in range(n)]
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    if isinstance(sampling, (str, bytes, dict)) or not hasattr(sampling, "__iter__"):
        raise InvalidRequestError(f"sampling must be a SamplingConfig or a list of them, got {type(sampling).__name__}")
    sampling = list(sampling)
    if len(sampling) != n:
        raise InvalidRequestError(f"got {len(sampling)} sampling configs for {n} prompts")
    return sampling


def _with(cfg: SamplingConfig, **changes: Any) -> SamplingConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)
