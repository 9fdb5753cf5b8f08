"""Runtime behaviour through the engine: batch invariance, preemption, page accounting, prefix sharing,
sampling, beams, hooks and bad requests."""

import random

import pytest
import torch

import autodeploy
from autodeploy import LogitsProcessor, SamplingConfig, StoppingCriteria
from autodeploy.runtime.engine import Engine
from helpers import drive
from model_zoo import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=5)


@pytest.fixture(scope="module")
def cm(model):
    return autodeploy.compile(model, max_batch_size=8, max_seq_len=96, page_size=4, max_num_tokens=48)


def _greedy(n):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True)


def test_batch_invariance_random_stream(cm):
    rng = random.Random(0)
    arrivals = [(rng.randint(0, 40), [rng.randrange(128) for _ in range(rng.randint(1, 40))],
                 _greedy(rng.randint(1, 16))) for _ in range(50)]
    engine = Engine(cm)
    stream = drive(engine, arrivals)
    assert engine.kv.all_free()
    for (_, prompt, cfg), out in zip(arrivals, stream):
        alone = Engine(cm).generate([prompt], cfg)[0]
        assert out.output_ids == alone.output_ids
        assert len(out.output_ids) == cfg.max_new_tokens


def test_preemption_gives_identical_outputs(model):
    rng = random.Random(1)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(8, 20))] for _ in range(8)]
    roomy = autodeploy.compile(model, max_batch_size=8, max_seq_len=64, page_size=4)
    ref = Engine(roomy).generate(prompts, _greedy(24))
    tight = autodeploy.compile(model, max_batch_size=8, max_seq_len=64, page_size=4, num_pages=16)
    engine = Engine(tight)
    got = engine.generate(prompts, _greedy(24))
    assert engine.stats.num_preemptions > 0, "the cache was meant to be too small for the load"
    assert [o.output_ids for o in got] == [o.output_ids for o in ref]
    assert all(o.error is None for o in got)
    assert engine.kv.all_free()


def test_request_too_large_for_cache_fails_alone(model):
    tiny = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=6)
    engine = Engine(tiny)
    with pytest.raises(autodeploy.InvalidRequestError, match="KV pages"):
        engine.add_request(list(range(40)), _greedy(4))
    out = engine.generate([[1, 2, 3]], _greedy(4))
    assert len(out[0].output_ids) == 4 and engine.kv.all_free()


def test_prefix_sharing_saves_pages_and_keeps_outputs(model):
    cm_share = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)
    cm_plain = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4,
                                  enable_prefix_caching=False)
    prefix = list(range(10, 26))  # 16 tokens = 4 full pages
    prompts = [prefix + [40 + i, 50 + i] for i in range(3)]
    shared = Engine(cm_share)
    first = shared.generate(prompts[:1], _greedy(6))
    rest = shared.generate(prompts[1:], _greedy(6))
    plain = Engine(cm_plain).generate(prompts, _greedy(6))
    assert [o.output_ids for o in first + rest] == [o.output_ids for o in plain]
    assert all(o.metrics.num_cached_prompt_tokens == 16 for o in rest)
    # the second request's own allocation: only the non-shared tail pages are new
    engine = Engine(cm_share)
    engine.generate(prompts[:1], _greedy(1))
    free_before = engine.kv.usage()["free_pages"]
    req = engine.add_request(prompts[1], _greedy(8))
    engine.step()
    assert engine.kv.num_pages_of(req.seqs[0].seq_id) == 5
    fresh = free_before - engine.kv.usage()["free_pages"]
    assert fresh == 1, f"only the tail page should be new; {fresh} pages came from the free list"
    engine.run_until_done()
    assert engine.kv.all_free()


def test_full_prompt_hit_uses_copy_on_write(cm):
    prompt = list(range(1, 17))  # exactly 4 pages: a full hit recomputes the last token into a copy
    engine = Engine(cm)
    a = engine.generate([prompt], _greedy(5))[0]
    b = engine.generate([prompt], _greedy(5))[0]
    assert b.metrics.num_cached_prompt_tokens == 15
    assert a.output_ids == b.output_ids
    assert engine.kv.all_free()


def test_seeded_sampling_is_batch_independent(cm):
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    alone = Engine(cm).generate([[3, 4, 5]], cfg)[0].output_ids
    others = [SamplingConfig(max_new_tokens=9, temperature=1.3, seed=s, ignore_eos=True) for s in range(5)]
    mixed = Engine(cm).generate([[9, 9], [3, 4, 5], [1] * 7, [2, 3], [4], [5, 6, 7, 8]],
                                [others[0], cfg] + others[1:])
    assert mixed[1].output_ids == alone
    again = Engine(cm).generate([[3, 4, 5]], cfg)[0].output_ids
    assert again == alone


def test_zero_temperature_equals_greedy(cm):
    greedy = Engine(cm).generate([[7, 8, 9]], _greedy(10))[0].output_ids
    cold = Engine(cm).generate([[7, 8, 9]], SamplingConfig(max_new_tokens=10, temperature=1e-6, seed=0,
                                                           ignore_eos=True))[0].output_ids
    assert cold == greedy


def test_n_samples(cm):
    out = Engine(cm).generate([[1, 2, 3]], SamplingConfig(max_new_tokens=8, temperature=1.0, n=3, seed=7,
                                                          ignore_eos=True))[0]
    assert len(out.samples) == 3 and all(len(s) == 8 for s in out.samples)
    assert len({tuple(s) for s in out.samples}) > 1


def test_beam_search_matches_hf(model, cm):
    prompt = [5, 17, 33, 2, 90]
    out = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=10, beam_width=3, n=2, ignore_eos=True))[0]
    gen = model.generation_config
    saved, gen.eos_token_id = gen.eos_token_id, None
    try:
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=3, num_return_sequences=2,
                             do_sample=False, pad_token_id=0)
    finally:
        gen.eos_token_id = saved
    assert out.samples == [r[len(prompt):].tolist() for r in ref]


class BanToken(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, token_ids, logits):
        logits[self.token] = float("-inf")
        return logits


class StopAfter(StoppingCriteria):
    def __init__(self, n_prompt, n):
        self.limit = n_prompt + n

    def __call__(self, token_ids, new_token):
        return len(token_ids) >= self.limit


def test_custom_logits_processor_and_stopping_criteria(cm):
    base = Engine(cm).generate([[1, 2, 3]], _greedy(12))[0].output_ids
    banned = base[0]
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True, logits_processors=[BanToken(banned)])
    out = Engine(cm).generate([[1, 2, 3]], cfg)[0].output_ids
    assert banned not in out and out != base
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True, stopping_criteria=[StopAfter(3, 5)])
    out = Engine(cm).generate([[1, 2, 3]], cfg)[0]
    assert out.output_ids == base[:5] and out.finish_reason == "stop"
    # attached globally
    out = Engine(cm, logits_processors=[BanToken(banned)]).generate([[1, 2, 3]], _greedy(12))[0].output_ids
    assert banned not in out


def test_stop_token_ids(cm):
    base = Engine(cm).generate([[1, 2, 3]], _greedy(12))[0].output_ids
    stop = base[4]
    out = Engine(cm).generate([[1, 2, 3]], SamplingConfig(max_new_tokens=12, ignore_eos=True,
                                                          stop_token_ids=[stop]))[0]
    assert out.output_ids == base[:base.index(stop) + 1] and out.finish_reason == "stop"


def test_bad_requests_fail_alone(model):
    """Invalid input raises before any work starts, naming the prompt and the cause (the LLM error rule); the
    good prompts then run unaffected and nothing is leaked."""
    llm = autodeploy.LLM(model, max_batch_size=4, max_seq_len=64, page_size=4)
    good = [[1, 2, 3], [4, 5]]
    ref = llm.generate(good, _greedy(6))
    bad_cfg = _greedy(6)
    bad_cfg.temperature = -1.0  # construction refuses it; a config edited afterwards is caught at submit
    cases = [([], _greedy(6), "empty prompt"), ([1, 999], _greedy(6), "outside the vocabulary"),
             ([1] * 80, _greedy(6), "max_seq_len"), ([7, 7], bad_cfg, "temperature")]
    for prompt, cfg, why in cases:
        with pytest.raises(autodeploy.InvalidRequestError, match=f"prompt 1: .*{why}"):
            llm.generate([[1, 2, 3], prompt], [_greedy(6), cfg])
    with pytest.raises(autodeploy.SamplingConfigError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    for junk in (None, 5, {"a": 1}):
        with pytest.raises(autodeploy.InvalidRequestError, match="prompts must be"):
            llm.generate(junk)
    with pytest.raises(autodeploy.InvalidRequestError, match="a prompt must be a list of token ids, got NoneType"):
        llm.generate([[1, 2], None])
    assert [o.output_ids for o in llm.generate(good, _greedy(6))] == [o.output_ids for o in ref]
    llm.engine.kv.check_all_free()


def test_generate_stream_yields_tokens_in_order(model):
    llm = autodeploy.LLM(model, max_batch_size=4, max_seq_len=64, page_size=4)
    ref = llm.generate([[1, 2, 3], [5, 6]], _greedy(5))
    seen = {}
    finals = {}
    for ev in llm.generate_stream([[1, 2, 3], [5, 6]], _greedy(5)):
        seen.setdefault(ev.request_id, []).append(ev.token_id)
        if ev.finished:
            finals[ev.request_id] = ev.output
    assert sorted(map(tuple, seen.values())) == sorted(tuple(o.output_ids) for o in ref)
    assert all(f.metrics.ttft is not None and f.metrics.num_generated == 5 for f in finals.values())


def test_invalid_sampling_values_raise_on_submit(cm):
    engine = Engine(cm)
    for bad in (dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(beam_width=0)):
        with pytest.raises(autodeploy.SamplingConfigError):
            engine.add_request([1, 2], SamplingConfig(**bad))
    assert not engine.has_work()


def test_sequence_outgrowing_the_whole_cache_ends_gracefully(model):
    """A cache smaller than one max_seq_len sequence: the request stops with its tokens, nothing crashes,
    other requests complete, no page leaks."""
    tiny = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=6)
    engine = Engine(tiny)
    outs = engine.generate([[1, 2, 3, 4, 5], [7, 8]], [_greedy(40), _greedy(3)])
    assert outs[0].finish_reason == "kv_cache_full" and 0 < len(outs[0].output_ids) < 40
    assert outs[0].error is None
    roomy = Engine(autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4))
    full = roomy.generate([[1, 2, 3, 4, 5]], _greedy(40))[0].output_ids
    assert outs[0].output_ids == full[:len(outs[0].output_ids)]
    assert len(outs[1].output_ids) == 3
    assert engine.kv.all_free()


def test_n_samples_whose_prompts_exceed_the_token_budget_are_chunked(cm):
    """n sequences x prompt > max_num_tokens (48): each sample's prefill is chunked to a share of the budget
    instead of the request never being scheduled."""
    cfg = SamplingConfig(max_new_tokens=4, temperature=1.0, n=4, seed=3, ignore_eos=True)
    engine = Engine(cm)
    out = drive(engine, [(0, list(range(1, 31)), cfg)], max_steps=50)[0]
    assert out.error is None and [len(s) for s in out.samples] == [4, 4, 4, 4]
    engine.kv.check_all_free()


def test_engine_freezes_start_up_objects_only_when_asked(cm):
    """An engine for a process that serves one model moves the objects alive at its start out of the
    collector's reach (a full collection over them stalled serving steps); by default (library calls such as
    ``cm.generate``, which make and drop engines) it leaves them, since frozen cycles are never collected.
    The benchmark records the collector's pauses by generation."""
    import gc

    from autodeploy.entrypoints.bench import gc_pauses

    gc.unfreeze()
    assert Engine(cm).gc_frozen is False and gc.get_freeze_count() == 0
    cm.generate([[1, 2, 3]], max_new_tokens=2)
    assert gc.get_freeze_count() == 0
    try:
        engine = Engine(cm, freeze_gc=True)
        assert engine.gc_frozen and gc.get_freeze_count() > 0
        assert engine.generate([[1, 2, 3]], _greedy(3))[0].output_ids == Engine(cm).generate([[1, 2, 3]],
                                                                                            _greedy(3))[0].output_ids
    finally:
        gc.unfreeze()
    with gc_pauses() as pauses:
        gc.collect()
    assert pauses[2]["count"] >= 1 and pauses[2]["max_s"] > 0


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 1023])
def test_step_host_buffer_sections_are_16_byte_aligned(n):
    """Triton specialises on 16-byte pointer alignment: a section at an 8-byte offset is a kernel variant the
    warm-up never compiled (step_buffer.py)."""
    from autodeploy.backends.triton.kernels.sampling import NUM_FIELDS
    from autodeploy.runtime.step_buffer import step_host_buffer

    buf = step_host_buffer(n, pin_memory=False)
    base = buf.tokens.data_ptr()
    for name, t, shape in (("tokens", buf.tokens, (n,)), ("row_sums", buf.row_sums, (n,)),
                           ("params", buf.params, (n, NUM_FIELDS))):
        assert tuple(t.shape) == shape and t.is_contiguous(), name
        assert (t.data_ptr() - base) % 16 == 0, f"{name} at byte offset {t.data_ptr() - base}"
    ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                  for t in (buf.tokens, buf.row_sums, buf.params))
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "sections overlap"
