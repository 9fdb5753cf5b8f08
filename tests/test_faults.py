"""Fault injection: user hooks that raise or misbehave, non-finite logits, and interrupts at many points inside a
step, on the synchronous and the asynchronous scheduling paths. After every fault the other requests finish
right, the next request is served, and every KV page is accounted for."""

import pytest

import autodeploy
from autodeploy import LogitsProcessor, SamplingConfig, StoppingCriteria
from autodeploy.runtime.engine import Engine
from model_zoo import make_model

PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [42, 43]]


@pytest.fixture(scope="module")
def cm():
    return autodeploy.compile(make_model("llama", seed=21), max_batch_size=4, max_seq_len=64, page_size=4,
                              num_pages=40)


def _greedy(n=8, **kw):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def ref(cm):
    return [o.output_ids for o in Engine(cm, async_scheduling=False).generate(PROMPTS, _greedy())]


def assert_clean(engine):
    """Nothing left running, every page back (no leaked or lost page), bookkeeping consistent."""
    assert not engine.has_work() and not engine.requests
    assert not engine.scheduler.running and not engine.scheduler.waiting
    engine.kv.check_all_free()


def assert_serves(engine, ref):
    """A normal request after a fault: right tokens, nothing leaked."""
    assert engine.generate([PROMPTS[1]], _greedy())[0].output_ids == ref[1]
    assert_clean(engine)


# -- user hooks -----------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


class RaisingProcessor(LogitsProcessor):
    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, token_ids, logits):
        self.calls += 1
        if self.calls >= self.at:
            raise Boom(f"processor call {self.calls}")
        return logits


class BatchedRaisingProcessor(RaisingProcessor):
    batched = True


class WrongShapeProcessor(RaisingProcessor):
    def __call__(self, token_ids, logits):
        self.calls += 1
        return logits[:-1] if self.calls >= self.at else logits


class NotATensorProcessor(RaisingProcessor):
    def __call__(self, token_ids, logits):
        self.calls += 1
        return logits.tolist() if self.calls >= self.at else logits


class NonFiniteProcessor(RaisingProcessor):
    def __init__(self, at, value):
        super().__init__(at)
        self.value = value

    def __call__(self, token_ids, logits):
        self.calls += 1
        if self.calls >= self.at:
            if self.value == "ban-all":
                logits[:] = float("-inf")
            else:
                logits[3] = self.value
        return logits


class RaisingStop(StoppingCriteria):
    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, token_ids, new_token):
        self.calls += 1
        if self.calls >= self.at:
            raise Boom(f"stop call {self.calls}")
        return False


HOOKS = {
    "processor": (lambda at: dict(logits_processors=[RaisingProcessor(at)]), "RaisingProcessor raised Boom"),
    "batched-processor": (lambda at: dict(logits_processors=[BatchedRaisingProcessor(at)]),
                          "BatchedRaisingProcessor raised Boom"),
    "wrong-shape": (lambda at: dict(logits_processors=[WrongShapeProcessor(at)]), "WrongShapeProcessor returned shape"),
    "not-a-tensor": (lambda at: dict(logits_processors=[NotATensorProcessor(at)]), "NotATensorProcessor returned a list"),
    "nan": (lambda at: dict(logits_processors=[NonFiniteProcessor(at, float("nan"))]), "NonFiniteProcessor produced non-finite"),
    "inf": (lambda at: dict(logits_processors=[NonFiniteProcessor(at, float("inf"))]), "NonFiniteProcessor produced non-finite"),
    "ban-all": (lambda at: dict(logits_processors=[NonFiniteProcessor(at, "ban-all")]), "NonFiniteProcessor produced non-finite"),
    "stopping-criteria": (lambda at: dict(stopping_criteria=[RaisingStop(at)]), "RaisingStop raised Boom"),
}


@pytest.mark.parametrize("at,async_scheduling", [(1, False), (4, True)], ids=["prefill-sync", "decode-async"])
@pytest.mark.parametrize("kind", list(HOOKS))
def test_misbehaving_hook_fails_only_its_request(cm, ref, kind, at, async_scheduling):
    make, message = HOOKS[kind]
    engine = Engine(cm, async_scheduling=async_scheduling)
    configs = [_greedy(), _greedy(**make(at)), _greedy(), _greedy(temperature=0.8, seed=3, **make(at + 1))]
    outs = engine.generate(PROMPTS, configs)
    for i in (0, 2):
        assert outs[i].error is None and outs[i].output_ids == ref[i], f"request {i} was disturbed"
    for i in (1, 3):
        assert outs[i].finish_reason == "error" and message in outs[i].error, outs[i].error
        assert len(outs[i].output_ids) < 8
    assert_clean(engine)
    assert_serves(engine, ref)


def test_hook_error_message_names_exception_text(cm):
    out = Engine(cm).generate([[1, 2]], _greedy(logits_processors=[RaisingProcessor(2)]))[0]
    assert out.error == "logits processor RaisingProcessor raised Boom: processor call 2"
    assert len(out.output_ids) == 1  # the first token was fine and is kept


# -- non-finite model logits ----------------------------------------------------------------------------------
def _poison_model(monkeypatch, cm, engine, victim, after_tokens, value=float("nan")):
    """Make the model's logits for ``victim``'s sequence non-finite once it has ``after_tokens`` tokens."""
    packed = {}
    pack, forward = cm.pack, cm.forward

    def spy_pack(chunks, *a, **kw):
        batch = pack(chunks, *a, **kw)
        packed[id(batch)] = list(chunks)
        return batch

    def bad_forward(batch):
        logits = forward(batch)
        chunks = packed.pop(id(batch))
        seq = victim.seqs[0]
        if seq.seq_id not in engine.kv or len(seq.output_ids) < after_tokens:
            return logits
        mine = engine.kv.pages_view(seq.seq_id)
        rows = [i for i, c in enumerate(batch.logits_rows) if chunks[c].pages is mine]
        if rows:
            logits = logits.clone()
            logits[rows[0], 7] = value
        return logits

    monkeypatch.setattr(cm, "pack", spy_pack)
    monkeypatch.setattr(cm, "forward", bad_forward)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_model_non_finite_logits_fail_the_request(cm, ref, monkeypatch, async_scheduling, value):
    engine = Engine(cm, async_scheduling=async_scheduling)
    reqs = [engine.add_request(p, _greedy()) for p in PROMPTS]
    _poison_model(monkeypatch, cm, engine, reqs[2], after_tokens=3, value=value)
    engine.run_until_done()
    outs = [engine.output(r) for r in reqs]
    assert outs[2].finish_reason == "error" and "the model produced non-finite logits" in outs[2].error
    got = outs[2].output_ids  # asynchronous scheduling launches the poisoned forward one token later
    assert got == ref[2][:len(got)] and len(got) == (4 if async_scheduling else 3)
    assert [o.output_ids for i, o in enumerate(outs) if i != 2] == [r for i, r in enumerate(ref) if i != 2]
    if async_scheduling:
        assert engine.stats.num_async_steps > 0
    assert_clean(engine)
    monkeypatch.undo()
    assert_serves(engine, ref)


def test_model_non_finite_with_processor_blames_the_model(cm, monkeypatch):
    """A row that is already NaN before the processors runs is the model's fault, not the processor's."""
    engine = Engine(cm)
    req = engine.add_request(PROMPTS[0], _greedy(logits_processors=[RaisingProcessor(10**6)]))
    _poison_model(monkeypatch, cm, engine, req, after_tokens=2)
    engine.run_until_done()
    out = engine.output(req)
    assert "the model produced non-finite logits" in out.error and "RaisingProcessor" not in out.error
    assert_clean(engine)


# -- interrupts inside a step ---------------------------------------------------------------------------------
def _interrupt(monkeypatch, obj, name, at, after=False):
    """Raise KeyboardInterrupt at the ``at``-th call of ``obj.name`` (before it runs, or after it returned)."""
    orig = getattr(obj, name)
    calls = {"n": 0}

    def wrapper(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at and not after:
            raise KeyboardInterrupt(f"{name} #{at}")
        out = orig(*a, **kw)
        if calls["n"] == at and after:
            raise KeyboardInterrupt(f"after {name} #{at}")
        return out

    monkeypatch.setattr(obj, name, wrapper)


POINTS = [
    ("engine", "_launch"), ("engine", "_launch_ahead"), ("engine", "_sample"), ("engine", "_complete"),
    ("engine", "_append"), ("engine", "_append+"), ("engine", "_beam_decide"), ("engine", "_beam_apply"),
    ("engine", "_finish"), ("scheduler", "schedule"), ("scheduler", "schedule+"), ("scheduler", "_admit"),
    ("scheduler", "finish"), ("kv", "allocate"), ("kv", "allocate+"), ("kv", "ensure_slots"),
    ("kv", "ensure_slots+"), ("kv", "commit"), ("kv", "commit+"), ("kv", "free"), ("kv", "fork"),
    ("kv", "take_pending_copies"), ("cm", "forward"), ("cm", "forward+"), ("cm", "pack"), ("cm", "copy_pages"),
    ("sampler", "sample"),
]

# greedy (exact after recovery; long enough to reach asynchronous steps once the others are done), a beam
# search (restarts exactly; its forks make copy-on-write page copies), seeded n=2 sampling, penalties
MIXED = [(PROMPTS[0], _greedy(9)), (PROMPTS[1], _greedy(8)), (PROMPTS[2], _greedy(3, beam_width=2)),
         (PROMPTS[3], SamplingConfig(max_new_tokens=4, temperature=1.0, n=2, seed=5, ignore_eos=True)),
         (PROMPTS[1], _greedy(3, repetition_penalty=1.2)),
         (PROMPTS[0], _greedy(3, min_tokens=1))]  # min_tokens: a host-sampler request (penalties run on the device)
EXACT = [0, 1, 2, 4, 5]  # requests whose output must equal the uninterrupted run's


@pytest.fixture(scope="module")
def mixed_ref(cm):
    prompts, cfgs = zip(*MIXED)
    return Engine(cm, async_scheduling=False).generate(list(prompts), list(cfgs))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("owner,point", POINTS, ids=[f"{o}.{p}" for o, p in POINTS])
def test_interrupt_inside_a_step_leaves_the_engine_consistent(cm, ref, mixed_ref, monkeypatch, owner, point,
                                                              async_scheduling):
    after = point.endswith("+")  # "+": right after the call returned, else right before it runs
    name = point.rstrip("+")
    if name == "_launch_ahead" and not async_scheduling:
        pytest.skip("the synchronous path launches nothing ahead")
    engine = Engine(cm, async_scheduling=async_scheduling)
    obj = {"engine": engine, "scheduler": engine.scheduler, "kv": engine.kv, "cm": cm,
           "sampler": engine.sampler}[owner]
    reqs = [engine.add_request(p, c) for p, c in MIXED]
    _interrupt(monkeypatch, obj, name, 2, after)
    interrupted = False
    steps = 0
    while engine.has_work():
        try:
            engine.step()
        except KeyboardInterrupt:
            assert not interrupted, "interrupted twice"
            interrupted = True
            engine.kv.check_invariants()
        steps += 1
        assert steps < 500, "engine does not make progress after the interrupt"
    monkeypatch.undo()
    assert interrupted, f"{owner}.{name} was never reached twice: the test proves nothing"
    outs = [engine.output(r) for r in reqs]
    assert all(o.error is None for o in outs), [o.error for o in outs]
    for i in EXACT:
        assert outs[i].samples == mixed_ref[i].samples, f"request {i} differs after the interrupt"
    assert all(len(s) == 4 for s in outs[3].samples)
    assert_clean(engine)
    assert_serves(engine, ref)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_interrupted_generate_aborts_its_requests_and_reraises(cm, ref, monkeypatch, async_scheduling):
    engine = Engine(cm, async_scheduling=async_scheduling)
    _interrupt(monkeypatch, engine, "_complete", 3)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS, _greedy())
    monkeypatch.undo()
    assert_clean(engine)
    assert [o.output_ids for o in engine.generate(PROMPTS, _greedy())] == ref
    assert_clean(engine)


def test_forward_error_fails_the_step_requests_and_engine_goes_on(cm, ref, monkeypatch):
    """An exception outside user code that cannot be pinned on one request fails the requests of its step
    (with the cause), never hangs, and the engine serves the next call."""
    engine = Engine(cm, async_scheduling=False)
    orig, calls = cm.forward, {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device fell over")
        return orig(batch)

    monkeypatch.setattr(cm, "forward", flaky)
    outs = engine.generate(PROMPTS, _greedy())
    assert all(o.finish_reason == "error" and "RuntimeError: device fell over" in o.error for o in outs)
    assert_clean(engine)
    monkeypatch.undo()
    assert_serves(engine, ref)


def test_stalled_running_request_is_repaired_not_spun(cm, ref):
    """A running sequence with nothing left to compute (the old hang) is requeued and finishes right."""
    engine = Engine(cm, async_scheduling=False)
    req = engine.add_request(PROMPTS[0], _greedy())
    engine.step()
    seq = req.seqs[0]
    seq.num_computed = len(seq.token_ids)  # simulate the pre-fix bug: computed advanced, token never appended
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    assert engine.output(req).output_ids == ref[0]
    assert_clean(engine)


class InterruptedStop(StoppingCriteria):
    """Stops a request after ``n`` tokens, but the first time it gets there the user hits Ctrl-C inside it."""

    def __init__(self, prompt_len, n):
        self.prompt_len, self.n, self.fired = prompt_len, n, False

    def __call__(self, token_ids, new_token):
        if len(token_ids) - self.prompt_len >= self.n:
            if not self.fired:
                self.fired = True
                raise KeyboardInterrupt("inside a stopping criterion")
            return True
        return False


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_interrupt_inside_a_stop_check_is_rolled_back(cm, ref, async_scheduling):
    """The token whose stop check was interrupted is taken back and decided again: the stop is honoured."""
    engine = Engine(cm, async_scheduling=async_scheduling)
    reqs = [engine.add_request(p, _greedy()) for p in PROMPTS]
    victim = engine.add_request(PROMPTS[0], _greedy(stopping_criteria=[InterruptedStop(len(PROMPTS[0]), 4)]))
    interrupted = 0
    while engine.has_work():
        try:
            engine.step()
        except KeyboardInterrupt:
            interrupted += 1
    assert interrupted == 1
    out = engine.output(victim)
    assert out.output_ids == ref[0][:4] and out.finish_reason == "stop"
    assert [engine.output(r).output_ids for r in reqs] == ref
    assert_clean(engine)
