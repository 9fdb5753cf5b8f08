"""One engine owner for many clients: :class:`EngineService` runs an :class:`~autodeploy.runtime.engine.Engine` on a
background thread and offers a thread-safe (and asyncio-friendly) request API.

The owner thread is the only thread that touches the engine. Clients call :meth:`EngineService.submit`,
:meth:`~EngineService.abort`, :meth:`~EngineService.stats` and :meth:`~EngineService.shutdown` from any thread;
submissions and aborts travel to the owner as commands, tokens come back as :class:`TokenEvent` s on each
request's :class:`RequestStream` (iterate it in a thread, ``async for`` it in an event loop, or wait for
:meth:`RequestStream.result`). The loop: take the queued commands, run one ``Engine.step``, hand the new tokens to
their streams; sleep when there is nothing to do.

What is guaranteed:

- **Validation is synchronous.** ``submit`` checks the prompt and sampling config in the caller's thread and
  raises :class:`~autodeploy.errors.InvalidRequestError` / ``SamplingConfigError`` naming the cause; a request
  it accepts is never rejected later for its input (it may still fail while running, e.g. a hook that raises).
- **Every accepted request ends**, with exactly one final event (``finished=True``, ``finish_reason`` and the
  ``output``): normally, by ``abort`` (``"abort"``), by a failure of its own (``"error"`` and ``output.error``),
  or when the engine fails for good or the service shuts down (``"error"``/``"abort"``). Nothing hangs: a failed
  step fails its requests; an error the engine cannot pin on requests fails every pending stream with it.
- **Ordering.** A request's events come in generation order (per sample, with samples interleaved by step).
  Requests are handed to the engine in the order ``submit`` accepted them; the engine admits FCFS (within the
  scheduler's admission policy), preempts the newest first and resumes preempted work before new arrivals.
- **Isolation.** A caller only sees its own request's events. Outputs do not depend on what else is running:
  greedy tokens equal those of the request run alone (batch invariance of the runtime), and a seeded sampled
  request draws from its own generator, so it reproduces across batch compositions and concurrency.
  (Not across an interrupted-and-rolled-back step, which may redraw a seeded sample's noise.)
- **Backpressure.** With ``max_waiting`` set, ``submit`` raises :class:`~autodeploy.errors.EngineOverloadedError`
  while that many requests are queued or waiting for admission (the waiting count is the owner's snapshot after
  its last step, so it may lag by the admissions of the step in progress).
- **Shutdown.** ``shutdown(drain=True)`` refuses new requests (:class:`~autodeploy.errors.EngineClosedError`) and
  returns when the accepted ones have finished (after ``timeout`` the rest are aborted); ``drain=False`` aborts
  them at once. The engine stays usable directly afterwards.

One service owns an engine at a time: a new ``EngineService(engine)`` drains and replaces the previous one
(``engine.service``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Optional

from autodeploy.errors import (AutoDeployError, ConfigError, EngineClosedError, EngineOverloadedError,
                               InvalidRequestError)
from autodeploy.runtime.engine import Engine, drain_events
from autodeploy.runtime.request import Request, RequestMetrics, RequestOutput, SeqState, TokenEvent
from autodeploy.runtime.sampling import SamplingConfig

__all__ = ["EngineService", "RequestStream", "TokenEvent", "merge_streams"]

log = logging.getLogger(__name__)


class RequestStream:
    """The events of one request. Iterate it (blocking, any thread), ``async for`` it (never blocks the event
    loop), or call :meth:`result`. Several readers may read one stream; each sees every event."""

    def __init__(self, request_id: Any, prompt_ids: list[int], sampling: SamplingConfig):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition(threading.Lock())
        self._output: Optional[RequestOutput] = None
        self._done = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._listeners: list[Callable[["RequestStream", TokenEvent], None]] = []

    @property
    def finished(self) -> bool:
        return self._done

    # -- owner side ----------------------------------------------------------------------------------------
    def _push(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        with self._cond:
            if self._done:
                return
            self._events.extend(events)
            if events[-1].finished:
                self._done, self._output = True, events[-1].output
            waiters, self._waiters = self._waiters, []
            listeners = list(self._listeners)
            self._cond.notify_all()
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass
        for listener in listeners:
            for ev in events:
                listener(self, ev)

    def _listen(self, listener: Callable[["RequestStream", TokenEvent], None]) -> None:
        """Call ``listener(stream, event)`` for every event, the ones already pushed first."""
        with self._cond:  # replayed under the lock, so a concurrent push cannot overtake the past events
            for ev in self._events:
                listener(self, ev)
            self._listeners.append(listener)

    # -- client side ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[TokenEvent]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self._done:
                    self._cond.wait()
                if i >= len(self._events):
                    return
                ev = self._events[i]
            i += 1
            yield ev
            if ev.finished:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            fut = None
            with self._cond:  # held for list reads only: never blocks the loop on the engine
                if i < len(self._events):
                    ev = self._events[i]
                elif self._done:
                    return
                else:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is not None:
                await fut
                continue
            i += 1
            yield ev
            if ev.finished:
                return

    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        """Block until the request has finished; its output (``output.error`` says why when it failed)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
            return self._output


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def merge_streams(streams: Iterable[RequestStream]) -> Iterator[TokenEvent]:
    """The events of several streams in the order they were produced, until every stream has finished."""
    streams = list(streams)
    q: "queue.SimpleQueue[TokenEvent]" = queue.SimpleQueue()
    for s in streams:
        s._listen(lambda _s, ev: q.put(ev))
    left = len(streams)
    while left:
        ev = q.get()
        if ev.finished:
            left -= 1
        yield ev


class EngineService:
    """Owns ``engine`` on one background thread; thread-safe submission, abort, stats and shutdown.
    See the module docstring for what it guarantees."""

    def __init__(self, engine: Engine, max_waiting: Optional[int] = None):
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 1):
            raise ConfigError(f"max_waiting={max_waiting!r} is invalid: None (unbounded) or an int >= 1")
        previous = getattr(engine, "service", None)
        if previous is not None and not previous.closed:
            log.info("a new EngineService takes over the engine; draining the previous one")
            previous.shutdown(drain=True)
        self.engine = engine
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._commands: deque[tuple] = deque()
        self._streams: dict[Any, RequestStream] = {}  # accepted and not finished (guarded by _lock)
        self._num_queued = 0  # submit commands not yet taken by the owner
        self._engine_waiting = 0  # published by the owner after each step
        self._closing = False
        self._drain = True
        self._closed = False
        self._fatal: Optional[str] = None
        self._ids = itertools.count()
        # owner-thread state
        self._reqs: dict[Any, tuple[Request, RequestStream]] = {}
        self._stats: dict[str, int] = {}
        self._publish()
        engine.service = self
        self._thread = threading.Thread(target=self._run, name="autodeploy-engine-owner", daemon=True)
        self._thread.start()

    # -- client API (any thread) ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once shutdown started (or the owner thread stopped): submissions are refused."""
        return self._closing or self._closed

    def submit(self, prompt_ids: list[int], sampling: Optional[SamplingConfig] = None,
               request_id: Any = None) -> RequestStream:
        """Queue a request; returns its stream at once. Raises InvalidRequestError / SamplingConfigError (bad
        input, a request id in use), EngineOverloadedError (``max_waiting`` reached), EngineClosedError."""
        sampling = SamplingConfig() if sampling is None else sampling
        ids = self.engine.validate(prompt_ids, sampling)  # reads immutable engine settings only
        with self._lock:
            if self._closing or self._closed:
                raise EngineClosedError("the engine service is shut down" +
                                        (f" after a fatal error: {self._fatal}" if self._fatal else ""))
            if request_id is None:
                request_id = next(self._ids)
                while request_id in self._streams:
                    request_id = next(self._ids)
            elif request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            if self.max_waiting is not None and self._num_queued + self._engine_waiting >= self.max_waiting:
                raise EngineOverloadedError(
                    f"{self._num_queued + self._engine_waiting} requests are already waiting "
                    f"(max_waiting={self.max_waiting}); retry later")
            stream = RequestStream(request_id, ids, sampling)
            self._streams[request_id] = stream
            self._commands.append(("submit", stream))
            self._num_queued += 1
            self._wake.notify()
        return stream

    def abort(self, request_id: Any) -> None:
        """End a request (its stream finishes with ``finish_reason="abort"``) and free its pages. Idempotent;
        unknown or finished ids are ignored."""
        with self._lock:
            if request_id not in self._streams or self._closed:
                return
            self._commands.append(("abort", request_id))
            self._wake.notify()

    def stats(self) -> dict:
        """A snapshot taken by the owner after its last step: ``num_running``/``num_waiting`` (requests; waiting
        includes the queued ones), ``kv_pages_used``/``kv_pages_total``, ``num_preemptions``,
        ``requests_finished``, ``prompt_tokens`` (of requests added) and ``generation_tokens`` (counters)."""
        with self._lock:
            out = dict(self._stats)
            out["num_waiting"] += self._num_queued
            return out

    def shutdown(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        """Stop taking requests; with ``drain`` let the accepted ones finish (at most ``timeout`` seconds, then
        abort the rest), else abort them now. Returns when the owner thread has stopped."""
        with self._lock:
            self._closing = True
            self._drain = self._drain and drain
            self._wake.notify()
        if threading.current_thread() is self._thread:
            return  # called from a hook on the owner thread: the loop ends after this step
        self._thread.join(timeout if drain else None)
        if self._thread.is_alive():
            log.warning("shutdown: requests still running after %s s; aborting them", timeout)
            with self._lock:
                self._drain = False
                self._wake.notify()
            self._thread.join()

    # -- owner thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        why_end = "the engine service stopped"
        try:
            while True:
                with self._lock:
                    while not self._commands and not self._closing and not self._has_work():
                        self._wake.wait()
                    commands = list(self._commands)
                    self._commands.clear()
                    closing, drain = self._closing, self._drain
                for cmd in commands:
                    self._apply(cmd)
                if commands:
                    self._publish()
                if closing and (not drain or not self._reqs):
                    why_end = "the engine service shut down"
                    break
                if self._has_work():
                    try:
                        touched = engine.step()
                    except Exception as exc:  # noqa: BLE001 - no request to blame: fail them all, keep serving
                        log.exception("engine step failed")
                        self._fail_all(f"engine failure: {type(exc).__name__}: {exc}")
                        touched = []
                    self._publish()  # before the events: a client that saw its final event sees its effect
                    self._dispatch(touched)
                    if self._reqs and not engine.has_work():
                        self._end_orphans()
                self._publish()
        except BaseException as exc:  # noqa: BLE001 - never die silently: every stream learns why
            log.exception("the engine owner thread stopped")
            why_end = f"engine owner thread stopped: {type(exc).__name__}: {exc}"
            with self._lock:
                self._fatal = why_end
        finally:
            try:
                self._end_all(why_end)
            finally:
                with self._lock:
                    self._closed = True
                    leftover = list(self._streams.values())
                    self._streams.clear()
                    self._commands.clear()
                    self._num_queued = 0
                for stream in leftover:  # accepted but never handed to the engine
                    stream._push([self._final(stream, "abort", why_end)])
                if getattr(engine, "service", None) is self:
                    engine.service = None
                self._publish()

    def _has_work(self) -> bool:
        return bool(self._reqs) or self.engine.has_work()

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "submit":
            stream = cmd[1]
            with self._lock:
                self._num_queued -= 1
            try:
                req = self.engine.add_request(stream.prompt_ids, stream.sampling, request_id=stream.request_id)
            except Exception as exc:  # noqa: BLE001 - this request fails, the owner goes on
                why = str(exc) if isinstance(exc, AutoDeployError) else f"{type(exc).__name__}: {exc}"
                self._close_stream(stream, [self._final(stream, "error", why)])
                return
            self._reqs[stream.request_id] = (req, stream)
            return
        rid = cmd[1]
        entry = self._reqs.get(rid)
        if entry is None:
            return
        req, stream = entry
        self.engine.abort(rid)
        self._publish()  # its pages are free before its stream says so
        self._finish(req, stream)

    def _dispatch(self, touched: list[Request]) -> None:
        for req in touched:
            entry = self._reqs.get(req.request_id)
            if entry is None or entry[0] is not req:
                continue  # not ours (added to the engine directly)
            if req.finished:
                self._finish(req, entry[1])
                continue
            entry[1]._push(self._events(req))

    def _events(self, req: Request) -> list[TokenEvent]:
        raw = drain_events(req)
        if not raw:
            return []
        out = self.engine.output(req) if raw[-1][3] else None
        last_of = {i: j for j, (i, *_rest) in enumerate(raw)}
        events = []
        for j, (i, tok, lp, done) in enumerate(raw):
            ev = TokenEvent(req.request_id, i, tok, lp[0] if lp else None, lp[1] if lp else None, done,
                            out.finish_reason if done else None, out if done else None)
            if req.beam is None and last_of[i] == j and i < len(req.seqs):
                ev.sample_finished = req.seqs[i].state is SeqState.FINISHED
                if ev.sample_finished and not done:
                    ev.finish_reason = req.seqs[i].finish_reason  # this sample's own, before the request ends
            events.append(ev)
        return events

    def _finish(self, req: Request, stream: RequestStream) -> None:
        self._reqs.pop(req.request_id, None)
        self._close_stream(stream, self._events(req))

    def _close_stream(self, stream: RequestStream, events: list[TokenEvent]) -> None:
        with self._lock:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
        stream._push(events)

    def _fail_all(self, why: str) -> None:
        """The engine raised with no request to blame: fail every request it holds for us."""
        for rid, (req, stream) in list(self._reqs.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                log.exception("abort after an engine failure")
            req.error = req.error or why
            for s in req.seqs:
                if s.finish_reason == "abort":
                    s.finish_reason = "error"
            self._finish(req, stream)

    def _end_orphans(self) -> None:
        """Requests the engine no longer runs but never reported finished (cannot happen; never hang on it)."""
        for rid, (req, stream) in list(self._reqs.items()):
            if not req.finished:
                log.error("request %s was lost by the engine; failing it", rid)
                req.error = "internal error: the engine lost this request"
                for s in req.seqs:
                    s.state, s.finish_reason = SeqState.FINISHED, "error"
            self._finish(req, stream)

    def _end_all(self, why: str) -> None:
        """Owner exit: abort what is still running (pages freed) and end its streams."""
        for rid, (req, stream) in list(self._reqs.items()):
            try:
                self.engine.abort(rid)
            except BaseException:  # noqa: BLE001
                log.exception("abort at owner exit")
            if self._fatal:
                req.error = req.error or why
            try:
                self._finish(req, stream)
            except BaseException:  # noqa: BLE001
                self._close_stream(stream, [self._final(stream, "error" if self._fatal else "abort", why)])

    @staticmethod
    def _final(stream: RequestStream, reason: str, why: str) -> TokenEvent:
        out = RequestOutput(request_id=stream.request_id, prompt_ids=stream.prompt_ids, output_ids=[], samples=[],
                            finish_reason=reason, metrics=RequestMetrics(),
                            error=why if reason == "error" else None)
        return TokenEvent(stream.request_id, 0, -1, None, None, True, reason, out)

    def _publish(self) -> None:
        engine = self.engine
        sched, kv = engine.scheduler, engine.kv
        snap = {
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting),
            "kv_pages_used": kv.num_used_pages,
            "kv_pages_total": kv.num_pages,
            "num_preemptions": engine.stats.num_preemptions,
            "requests_finished": engine.stats.num_finished,
            "prompt_tokens": engine.stats.prompt_tokens,
            "generation_tokens": engine.stats.generation_tokens,
        }
        with self._lock:
            self._stats = snap
            self._engine_waiting = snap["num_waiting"]


def wait_all(streams: Iterable[RequestStream], timeout: Optional[float] = None) -> list[RequestOutput]:
    """Every stream's output, in order (``timeout`` is for all of them together)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    return [s.result(None if deadline is None else max(0.0, deadline - time.monotonic())) for s in streams]
