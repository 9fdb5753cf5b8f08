"""The engine loop: schedule -> nest_sequences (one upload) -> forward -> sample -> stop checks.

Asynchronous scheduling (on by default on a GPU): in steady decode the next step is packed and launched
*before* the host waits for the current step's sampled tokens; the next step's upload takes them from the
sampler's output on the device. Host work (scheduling, packing, stop checks) then overlaps the GPU
instead of adding to every step. Stops are applied one step late: a sequence that sampled EOS has already been
given one more forward, whose token is discarded (its KV write lands in pages it no longer owns, ordered on the
stream before any new owner writes). Requests that need the host between steps (beam search, penalties, logits
processors) and steps that admit or preempt requests run synchronously.

It owns no model-specific logic and talks to the compiled model only through ``pack``/``forward`` (the
metadata contract) and ``copy_pages`` (copy-on-write). A bad request fails alone with a clear error; the
others keep running. No request is lost: every added request ends finished or with an error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from autodeploy.errors import CacheCapacityError, InvalidRequestError
from autodeploy.metadata import SequenceChunk
from autodeploy.backends.triton.kernels.argmax import argmax_rows
from autodeploy.runtime.beam_search import BeamSearchState
from autodeploy.runtime.hooks import StopOnTokens
from autodeploy.runtime.kv_cache import KVCacheManager
from autodeploy.runtime.request import Request, RequestOutput, Sequence as Seq, SeqState
from autodeploy.runtime.sampling import Sampler, SamplingConfig, build_stopping_criteria, make_generator
from autodeploy.runtime.scheduler import AdmissionPolicy, Scheduler

log = logging.getLogger(__name__)


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
    """A forward on the GPU whose sampled tokens the host has not read yet."""

    items: list[tuple[Seq, int, int]]  # (sequence, new tokens, tokens computed after this step)
    ready: list[tuple[Seq, int]]  # sequences sampling in this step, with their logits row
    plain: list[Seq]  # the non-beam sequences of ``ready``, in the order of ``tokens``
    tokens: Optional[torch.Tensor]  # [len(plain)] on the host (pinned; valid once ``done`` has fired)
    device_tokens: Optional[torch.Tensor]  # the same tokens on the device: the next step's inputs
    logits: torch.Tensor  # valid until the next forward (CUDA-graph output buffers are reused)
    stats: StepStats
    done: Optional[torch.cuda.Event] = None  # fires when ``tokens`` has reached the host (GPU only)


@dataclass
class EngineStats:
    steps: list[StepStats] = field(default_factory=list)
    num_preemptions: int = 0
    num_async_steps: int = 0  # steps launched before the previous step's tokens reached the host


class Engine:
    """In-flight batching over a :class:`~autodeploy.runtime.compiled_model.CompiledModel`."""

    def __init__(self, cm: Any, logits_processors: Sequence[Any] = (), stopping_criteria: Sequence[Any] = (),
                 tokenizer: Any = None, max_batch_size: Optional[int] = None,
                 max_num_tokens: Optional[int] = None, record_stats: bool = False,
                 async_scheduling: Optional[bool] = None, admission: Optional[AdmissionPolicy] = None):
        self.cm = cm
        # Overlapping host and GPU only pays where the forward is asynchronous; forcing it on CPU tests it.
        self.async_scheduling = cm.device.type == "cuda" if async_scheduling is None else bool(async_scheduling)
        self._inflight: Optional[_Launched] = None
        self.kv = KVCacheManager(cm.num_pages, cm.page_size, enable_prefix_caching=cm.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_batch_size or cm.max_batch_size,
                                   max_num_tokens or cm.max_num_tokens, on_preempt=self._on_preempt,
                                   admission=admission)
        self.sampler = Sampler()
        self.global_processors = list(logits_processors)
        self.global_stopping = list(stopping_criteria)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(cm.info, "tokenizer", None)
        self.eos_token_ids = list(cm.info.eos_token_ids)
        self.requests: dict[Any, Request] = {}
        self.stats = EngineStats()
        self.record_stats = record_stats
        self._next_id = 0

    # -- submission ---------------------------------------------------------------------------------------
    def validate(self, prompt_ids: Any, sampling: SamplingConfig) -> list[int]:
        """Check a request before it touches any shared state; raise InvalidRequestError naming the cause."""
        if not isinstance(sampling, SamplingConfig):
            raise InvalidRequestError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        sampling.validate(self.cm.vocab_size)
        if isinstance(prompt_ids, torch.Tensor):
            prompt_ids = prompt_ids.reshape(-1).tolist()
        if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
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
        if request_id is None:
            request_id, self._next_id = self._next_id, self._next_id + 1
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self.global_processors:
            sampling = _with(sampling, logits_processors=list(sampling.logits_processors) + self.global_processors)
        req = Request(request_id, ids, sampling)
        req.plain_greedy = sampling.is_greedy and not sampling.logits_processors and not sampling.needs_penalties
        req.metrics.num_prompt_tokens = len(ids)
        detok = self.tokenizer.decode if self.tokenizer is not None else None
        checkers = build_stopping_criteria(sampling, self.eos_token_ids, len(ids), detok) + self.global_stopping
        req.stop_ids = frozenset().union(*(c.ids for c in checkers if isinstance(c, StopOnTokens)))
        req.stop_checkers = [c for c in checkers if not isinstance(c, StopOnTokens)]
        self._init_seqs(req)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _init_seqs(self, req: Request) -> None:
        cfg = req.sampling
        if cfg.is_beam_search:
            req.beam = BeamSearchState.from_config(cfg, eos_token_ids=[] if cfg.ignore_eos else self.eos_token_ids)
            req.seqs = [Seq(req, list(req.prompt_ids), len(req.prompt_ids))]
            return
        device = self.cm.device
        req.seqs = []
        for i in range(cfg.n):
            seed = None if cfg.seed is None else cfg.seed + i
            gen = make_generator(seed, device) if seed is not None else None
            req.seqs.append(Seq(req, list(req.prompt_ids), len(req.prompt_ids), generator=gen))

    def _on_preempt(self, req: Request) -> None:
        self.stats.num_preemptions += 1
        if req.beam is not None:  # beams restart from the prompt: recomputation reproduces them exactly
            self._init_seqs(req)

    # -- the loop ------------------------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work()

    def step(self) -> list[Request]:
        """Advance by one forward; return the requests that produced tokens or finished.

        With a step in flight, the next decode step is launched first (when possible) and then the in-flight
        step's tokens are read and applied; otherwise this schedules, launches and (unless it can stay in
        flight) completes a step synchronously.
        """
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._inflight = self._launch_ahead(prev)
            return self._complete(prev)
        st = StepStats()
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        touched: list[Request] = []
        for req, why in sched.rejected:
            self._fail(req, why)
            touched.append(req)
        for req in sched.truncated:  # outgrew the whole KV cache: end it gracefully, keeping its tokens
            log.warning("request %s stopped: the KV cache cannot hold it any longer", req.request_id)
            for s in req.live_seqs():
                s.state, s.finish_reason = SeqState.FINISHED, "kv_cache_full"
            if req.beam is not None:
                req.seqs = [Seq(req, req.prompt_ids + toks, len(req.prompt_ids), state=SeqState.FINISHED,
                                finish_reason="kv_cache_full") for toks in req.beam.finalize(max(1, req.sampling.n))]
            req.metrics.finished = time.perf_counter()
            self.scheduler.finish(req)
            touched.append(req)
        if not sched.items:
            if self.scheduler.has_work() and not self.scheduler.running and not sched.rejected:
                # Nothing can run and nothing holds pages: waiting requests can never fit. Fail, don't hang.
                req = self.scheduler.waiting.popleft()
                self._fail(req, "the KV cache cannot hold this request")
                touched.append(req)
            return touched
        chunks = [SequenceChunk(s.token_ids[s.num_computed:s.num_computed + n], s.num_computed,
                                self.kv.pages_view(s.seq_id), want_logits=s.num_computed + n == len(s.token_ids))
                  for s, n in sched.items]
        st.schedule = time.perf_counter() - t0
        launched = self._launch(sched.items, chunks, st)
        if self.async_scheduling and launched.device_tokens is not None \
                and all(_async_ok(s) for s, _ in launched.ready):
            self._inflight = launched  # read its tokens next step, after launching the one after it
            return touched
        return touched + self._complete(launched)

    def _launch(self, items: list[tuple[Seq, int]], chunks: list[SequenceChunk], st: StepStats,
                token_src: Optional[torch.Tensor] = None) -> _Launched:
        """Pack, run the forward and sample on the device; nothing here waits for the GPU.

        ``token_src``: the device tensor holding this step's input tokens (one per chunk, async decode); the
        packed ``input_ids`` then hold placeholders and are overwritten on the device.
        """
        t0 = time.perf_counter()
        self.cm.copy_pages(self.kv.take_pending_copies())
        # token_src: the upload takes the input tokens from the device (one-token chunks keep their order)
        batch = self.cm.pack(chunks, token_src=token_src)
        t1 = time.perf_counter()
        logits = self.cm.forward(batch)  # asynchronous on a GPU
        t2 = time.perf_counter()
        done_items = []
        for s, n in items:
            s.num_computed += n
            done_items.append((s, n, s.num_computed))
        rows = {batch.logits_rows[i]: i for i in range(len(batch.logits_rows))}
        ready = [(s, rows[i]) for i, (s, _) in enumerate(items) if i in rows]
        plain_rows = [(s, r) for s, r in ready if s.request.beam is None]
        plain = [s for s, _ in plain_rows]
        # On a GPU the tokens start their trip to the host now (into pinned memory, see _sample): a plain
        # .tolist() later would queue behind (and wait for) the next step's forward, serialising the very
        # overlap asynchronous scheduling is for.
        host = torch.empty((len(plain_rows),), dtype=torch.int64, pin_memory=True) \
            if plain_rows and logits.is_cuda else None
        tokens = device_tokens = self._sample(plain_rows, logits, host) if plain_rows else None
        done = None
        if host is not None:
            done = torch.cuda.Event()
            done.record()
            tokens = host
        st.pack, st.forward, st.sample = t1 - t0, t2 - t1, time.perf_counter() - t2
        st.num_seqs, st.num_tokens = len(items), sum(n for _, n in items)
        return _Launched(done_items, ready, plain, tokens, device_tokens, logits, st, done)

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
        src_rows, seqs = [], []
        for i, s in alive:
            n_out = len(s.token_ids) + 1 - s.prompt_len  # after prev's token is appended
            if n_out >= s.request.sampling.max_new_tokens or len(s.token_ids) + 1 >= self.cm.max_seq_len:
                continue  # finishes at prev for certain: no further step
            seqs.append(s)
            src_rows.append(i)
        if not seqs:
            return None
        try:
            if not all(self.kv.ensure_slots(s.seq_id, s.num_computed + 1) for s in seqs):
                return None  # out of pages: the scheduler preempts next step
        except CacheCapacityError:
            return None
        chunks = [SequenceChunk((0,), s.num_computed, self.kv.pages_view(s.seq_id)) for s in seqs]
        dev = prev.device_tokens
        src = dev if len(seqs) == len(prev.plain) else dev[torch.tensor(src_rows, device=dev.device)]
        st = StepStats(schedule=time.perf_counter() - t0)
        self.stats.num_async_steps += 1
        return self._launch([(s, 1) for s in seqs], chunks, st, token_src=src)

    def _complete(self, launched: _Launched) -> list[Request]:
        """Read a launched step's tokens (the one wait for the GPU) and apply them: append, stops, beams."""
        st = launched.stats
        t0 = time.perf_counter()
        for s, _n, computed in launched.items:
            if s.state is not SeqState.FINISHED and s.seq_id in self.kv:
                self.kv.commit(s.seq_id, s.token_ids, computed)
        t1 = time.perf_counter()
        wait = 0.0
        touched: dict[int, Request] = {}
        if launched.plain:
            if launched.done is not None:
                launched.done.synchronize()  # the one wait for the GPU (attributed to the forward)
                wait = time.perf_counter() - t1
            for s, tok in zip(launched.plain, launched.tokens.tolist()):
                if s.state is SeqState.FINISHED:
                    continue  # stopped one step earlier (asynchronous scheduling): its token is discarded
                self._append(s, tok)
                touched[id(s.request)] = s.request
        beams: dict[int, list[tuple[Seq, int]]] = {}
        for s, r in launched.ready:
            if s.request.beam is not None:
                beams.setdefault(id(s.request), []).append((s, r))
        for group in beams.values():
            req = group[0][0].request
            if len(group) != len(req.live_seqs()):
                continue  # some beams still prefilling (cannot happen: beams decode in lockstep)
            self._beam_step(req, group, launched.logits)
            touched[id(req)] = req
        now = time.perf_counter()
        for req in touched.values():
            if req.metrics.first_token is None:
                req.metrics.first_token = now
            if req.finished:
                req.metrics.finished = now
                self.scheduler.finish(req)
        if self.record_stats:
            st.forward += wait
            st.sample += now - t1 - wait
            st.bookkeeping = t1 - t0
            self.stats.steps.append(st)
        return list(touched.values())

    def _sample(self, plain: list[tuple[Seq, int]], logits: torch.Tensor,
                host: Optional[torch.Tensor]) -> torch.Tensor:
        """Next token of every non-beam sequence, on the device (no host synchronisation), and asynchronously
        into ``host`` (pinned) if given: the greedy kernel writes it there itself, saving a copy-engine trip."""
        rows = [r for _, r in plain]
        picked = logits[:len(rows)] if rows == list(range(len(rows))) else \
            logits.index_select(0, torch.tensor(rows, device=logits.device))
        if all(s.request.plain_greedy for s, _ in plain):  # hot path: one argmax
            return argmax_rows(picked, host_out=host)
        tokens = self.sampler.sample(
            picked, [s.request.sampling for s, _ in plain], [s.token_ids for s, _ in plain],
            [s.prompt_len for s, _ in plain], [s.generator for s, _ in plain], return_logprobs=False).tokens
        if host is not None:
            host.copy_(tokens, non_blocking=True)
        return tokens

    def _append(self, s: Seq, tok: int) -> None:
        req = s.request
        tokens = s.token_ids
        tokens.append(tok)
        n_out = len(tokens) - s.prompt_len
        if n_out > req.metrics.num_generated:
            req.metrics.num_generated = n_out
        req.new_tokens.append((0 if len(req.seqs) == 1 else req.seqs.index(s), tok))
        reason = None
        if tok in req.stop_ids:
            reason = "stop"
        elif req.stop_checkers and any(check(tokens, tok) for check in req.stop_checkers):
            reason = "stop"
        elif n_out >= req.sampling.max_new_tokens:
            reason = "length"
        elif len(tokens) >= self.cm.max_seq_len:
            reason = "max_seq_len"
        if reason is not None:
            s.state, s.finish_reason = SeqState.FINISHED, reason
            if s.seq_id in self.kv:
                self.kv.free(s.seq_id)

    def _beam_step(self, req: Request, group: list[tuple[Seq, int]], logits: torch.Tensor) -> None:
        idx = torch.tensor([r for _, r in group], device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        seqs = [s for s, _ in group]
        choices = req.beam.step(logprobs.cpu())
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

    def _fail(self, req: Request, why: str) -> None:
        req.error = why
        self.scheduler.finish(req)
        for s in req.seqs:
            s.state = SeqState.FINISHED
            s.finish_reason = "error"
        req.metrics.finished = time.perf_counter()
        log.warning("request %s failed: %s", req.request_id, why)

    # -- convenience ---------------------------------------------------------------------------------------
    def output(self, req: Request) -> RequestOutput:
        samples = [s.output_ids for s in req.seqs]
        out = RequestOutput(request_id=req.request_id, prompt_ids=req.prompt_ids,
                            output_ids=samples[0] if samples else [], samples=samples,
                            finish_reason=req.seqs[0].finish_reason if req.seqs else None,
                            metrics=req.metrics, error=req.error)
        if self.tokenizer is not None:
            out.texts = [self._trim(req, self.tokenizer.decode(x, skip_special_tokens=True)) for x in samples]
            out.text = out.texts[0] if out.texts else ""
        return out

    def _trim(self, req: Request, text: str) -> str:
        for stop in req.sampling.stop_strings:
            pos = text.find(stop)
            if pos >= 0:
                text = text[:pos]
        return text

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: Sequence[Any], sampling: Any = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion. ``sampling``: one config for all, or one per prompt.
        Invalid requests raise before any work starts."""
        configs = per_prompt_configs(sampling, len(prompts))
        for p, c in zip(prompts, configs):
            self.validate(p, c)
        reqs = [self.add_request(p, c) for p, c in zip(prompts, configs)]
        self.run_until_done()
        return [self.output(r) for r in reqs]

    def stream(self) -> Iterator[tuple[Request, int, int, bool]]:
        """Yield ``(request, sample index, token, request_done)`` as tokens are produced until no work is left.
        Beam search yields its final best sequence when it finishes (beams are not final before that)."""
        while self.has_work():
            for req in self.step():
                new, req.new_tokens = req.new_tokens, []
                if req.beam is not None and req.finished and req.seqs:
                    new = [(0, t) for t in req.seqs[0].output_ids]
                for j, (i, tok) in enumerate(new):
                    yield req, i, tok, req.finished and j == len(new) - 1


def _async_ok(s: Seq) -> bool:
    """Can this sequence's next step be launched before its last token reaches the host?"""
    cfg = s.request.sampling
    return s.request.beam is None and not cfg.logits_processors and not cfg.needs_penalties


def per_prompt_configs(sampling: Any, n: int, default: Optional[SamplingConfig] = None) -> list[SamplingConfig]:
    """One config for all prompts, one per prompt, or ``default`` (a fresh SamplingConfig) when None."""
    if sampling is None:
        return [default or SamplingConfig() for _ in range(n)]
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n
    sampling = list(sampling)
    if len(sampling) != n:
        raise InvalidRequestError(f"got {len(sampling)} sampling configs for {n} prompts")
    return sampling


def _with(cfg: SamplingConfig, **changes: Any) -> SamplingConfig:
    import dataclasses

    return dataclasses.replace(cfg, **changes)
