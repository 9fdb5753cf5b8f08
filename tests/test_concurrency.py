"""One engine owner for many callers: EngineService and LLM through it. Concurrent callers get exactly their own
outputs (equal to running alone), abort frees pages, backpressure, shutdown drain, asyncio streaming, fatal
engine errors end every stream instead of hanging, and a second thread driving an Engine gets a clear error."""

import asyncio
import threading
import time

import pytest

import autodeploy
from autodeploy import LogitsProcessor, SamplingConfig
from autodeploy.errors import EngineBusyError, EngineClosedError, EngineOverloadedError, InvalidRequestError
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.service import EngineService
from model_zoo import make_model

TIMEOUT = 120


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=31)


@pytest.fixture(scope="module")
def llm(model):
    return autodeploy.LLM(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)


def _greedy(n=6, **kw):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True, **kw)


def _prompts(t):
    return [[1 + t, 2 + t, 3], [9, 8 + t, 7, 6, 5], [40 + t] * (3 + t)]


def _wait_free(engine, deadline=10.0):
    """The owner frees pages before it reports the end of a stream; poll briefly anyway (it is another thread)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        if engine.kv.all_free() and not engine.has_work():
            engine.kv.check_all_free()
            return
        time.sleep(0.01)
    engine.kv.check_all_free()


class Gate(LogitsProcessor):
    """Blocks the engine's owner thread inside a step until released (to make races deterministic)."""

    def __init__(self, skip=0):
        self.entered, self.release = threading.Event(), threading.Event()
        self.skip = skip  # calls that pass before the gate closes

    def __call__(self, token_ids, logits):
        if self.skip:
            self.skip -= 1
            return logits
        self.entered.set()
        assert self.release.wait(TIMEOUT)
        return logits


def test_threads_calling_generate_get_their_own_outputs(llm):
    sampled = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=20, seed=11, ignore_eos=True)
    alone = {t: [o.output_ids for o in llm.generate(_prompts(t), _greedy())] for t in range(4)}
    alone_sampled = {t: llm.generate([_prompts(t)[0]], sampled)[0].output_ids for t in range(4)}
    results, errors = {}, []

    def caller(t):
        try:
            for _ in range(2):
                got = [o.output_ids for o in llm.generate(_prompts(t), _greedy())]
                assert got == alone[t], f"thread {t} got someone else's tokens"
                assert llm.generate([_prompts(t)[0]], sampled)[0].output_ids == alone_sampled[t]
            results[t] = True
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((t, exc))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors, errors
    assert len(results) == 4
    _wait_free(llm.engine)


def test_threads_streaming_at_once(llm):
    alone = {t: [o.output_ids for o in llm.generate(_prompts(t), _greedy())] for t in range(3)}
    got, errors = {}, []

    def caller(t):
        try:
            toks, finals = {}, {}
            for ev in llm.generate_stream(_prompts(t), _greedy()):
                if ev.token_id >= 0:
                    toks.setdefault(ev.request_id, []).append(ev.token_id)
                if ev.finished:
                    finals[ev.request_id] = ev.output.output_ids
            assert all(toks[r] == finals[r] for r in finals)
            got[t] = sorted(finals.values())
        except BaseException as exc:  # noqa: BLE001
            errors.append((t, exc))

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    assert not errors, errors
    assert {t: got[t] for t in got} == {t: sorted(alone[t]) for t in alone}
    _wait_free(llm.engine)


def _held_service(model):
    """A service whose owner thread is held inside a step by a gated processor on its first request; returns
    ``(engine, service, gate, first stream)``."""
    engine = Engine(autodeploy.compile(model, max_batch_size=2, max_seq_len=64, page_size=4))
    service = EngineService(engine)
    gate = Gate()
    first = service.submit([1, 2, 3], _greedy(3, logits_processors=[gate]))
    assert gate.entered.wait(TIMEOUT)
    return engine, service, gate, first


def test_direct_engine_use_from_a_second_thread_is_refused(model):
    engine, service, gate, stream = _held_service(model)  # the owner thread is inside a step
    with pytest.raises(EngineBusyError, match="another thread"):
        engine.step()
    with pytest.raises(EngineBusyError):
        engine.add_request([1, 2], _greedy())
    gate.release.set()
    assert len(stream.result(TIMEOUT).output_ids) == 3
    service.shutdown()
    _wait_free(engine)
    assert engine.generate([[1, 2]], _greedy(2))[0].error is None  # usable directly once the service is gone


def test_abort_mid_stream_frees_pages(model):
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=64, page_size=4)
    engine = Engine(cm)
    service = EngineService(engine)
    stream = service.submit(list(range(1, 12)), _greedy(40))
    other = service.submit([5, 6], _greedy(4))
    seen = []
    for ev in stream:
        seen.append(ev)
        if len(seen) == 3:
            service.abort(stream.request_id)
            service.abort(stream.request_id)  # idempotent
    assert seen[-1].finished and seen[-1].finish_reason == "abort" and seen[-1].output.finish_reason == "abort"
    assert 3 <= len(seen) < 40
    assert other.result(TIMEOUT).error is None and len(other.result().output_ids) == 4
    service.abort("no-such-request")
    _wait_free(engine)
    stats = service.stats()
    assert stats["kv_pages_used"] == 0 and stats["num_running"] == 0 and stats["requests_finished"] == 2
    assert stats["kv_pages_total"] == engine.kv.num_pages and stats["generation_tokens"] >= 7
    assert stats["prompt_tokens"] == 13
    service.shutdown()


def test_backpressure_and_validation_at_submit(model):
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=64, page_size=4)
    engine = Engine(cm)
    service = EngineService(engine, max_waiting=2)
    gate = Gate(skip=1)  # closes in the second step: the first one admitted the request
    first = service.submit([1, 2, 3], _greedy(3, logits_processors=[gate]))
    assert gate.entered.wait(TIMEOUT)  # the owner is stuck in a step: submissions queue up
    queued = [service.submit([4, 5], _greedy(2)), service.submit([6], _greedy(2))]
    with pytest.raises(EngineOverloadedError, match="max_waiting=2"):
        service.submit([7], _greedy(2))
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        service.submit([], _greedy(2))
    with pytest.raises(autodeploy.SamplingConfigError, match="top_p"):
        bad = _greedy(2)
        bad.top_p = 0.0
        service.submit([1], bad)
    with pytest.raises(InvalidRequestError, match="already in use"):
        service.submit([1], _greedy(2), request_id=queued[0].request_id)
    gate.release.set()
    assert [len(s.result(TIMEOUT).output_ids) for s in [first] + queued] == [3, 2, 2]
    service.submit([7], _greedy(2)).result(TIMEOUT)  # room again
    with pytest.raises(autodeploy.ConfigError):
        EngineService(engine, max_waiting=0)
    service.shutdown()
    _wait_free(engine)


def test_shutdown_drains_then_refuses(model):
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=64, page_size=4)
    engine = Engine(cm)
    service = EngineService(engine)
    streams = [service.submit([i + 1, i + 2], _greedy(5)) for i in range(5)]
    service.shutdown(drain=True)
    assert all(s.finished for s in streams)
    assert all(s.result().error is None and len(s.result().output_ids) == 5 for s in streams)
    with pytest.raises(EngineClosedError):
        service.submit([1], _greedy())
    assert service.closed and engine.service is None
    _wait_free(engine)


def test_shutdown_without_drain_aborts(model):
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=64, page_size=4)
    engine = Engine(cm)
    service = EngineService(engine)
    streams = [service.submit([i + 1, i + 2], _greedy(50)) for i in range(4)]
    next(iter(streams[0]))  # running
    service.shutdown(drain=False)
    reasons = [s.result(TIMEOUT).finish_reason for s in streams]
    assert "abort" in reasons and all(r in ("abort", "length", "max_seq_len") for r in reasons)
    _wait_free(engine)


def test_asyncio_streams_do_not_block_the_loop(model):
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)
    engine = Engine(cm)
    alone = [Engine(cm).generate([p], _greedy(8))[0].output_ids for p in _prompts(0)]
    service = EngineService(engine)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async def consume(p):
            toks = []
            async for ev in service.submit(p, _greedy(8)):
                if ev.token_id >= 0:
                    toks.append(ev.token_id)
                if ev.finished:
                    assert ev.output.output_ids == toks
            return toks

        tick = asyncio.ensure_future(ticker())
        got = await asyncio.gather(*(consume(p) for p in _prompts(0)))
        stop.set()
        await tick
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got == alone
    assert ticks > 5, "the event loop was blocked while tokens were being generated"
    service.shutdown()
    _wait_free(engine)


def test_fatal_engine_error_fails_every_stream_and_service_goes_on(model, monkeypatch):
    engine, service, gate, first = _held_service(model)
    others = [service.submit([4, 5], _greedy(3)), service.submit([6, 7], _greedy(3))]
    orig, calls = engine.scheduler.schedule, {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("scheduler bug")
        return orig()

    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    gate.release.set()
    outs = [s.result(TIMEOUT) for s in [first] + others]
    failed = [o for o in outs if o.finish_reason == "error"]
    assert failed and all("scheduler bug" in o.error for o in failed)
    assert service.submit([8, 9], _greedy(2)).result(TIMEOUT).error is None  # still serving
    service.shutdown()
    _wait_free(engine)


def test_owner_thread_death_ends_streams(model, monkeypatch):
    """Even a BaseException escaping the engine ends every stream (with the cause) and closes the service."""
    engine, service, gate, first = _held_service(model)
    second = service.submit([4, 5], _greedy(3))

    def dies():
        raise SystemExit("owner killed")

    monkeypatch.setattr(engine.scheduler, "schedule", dies)
    gate.release.set()
    outs = [first.result(TIMEOUT), second.result(TIMEOUT)]
    assert any(o.error and "owner killed" in o.error for o in outs)
    with pytest.raises(EngineClosedError, match="owner killed"):
        service.submit([1], _greedy())
    monkeypatch.undo()
    _wait_free(engine)
