"""SamplingConfig.logprobs and min_tokens: values against HF eager, vLLM-shaped outputs, streaming events,
validation at construction, and the plain-greedy hot path left alone."""

import math

import pytest
import torch

import autodeploy
from autodeploy import LogitsProcessor, SamplingConfig, StoppingCriteria
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.service import EngineService
from model_zoo import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=41)


@pytest.fixture(scope="module")
def cm(model):
    return autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)


def _hf_logprobs(model, prompt, out, processor=None):
    """log_softmax of HF eager's fp32 next-token logits before each generated token."""
    rows = []
    with torch.no_grad():
        for i in range(len(out)):
            ids = prompt + out[:i]
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if processor is not None:
                logits = processor(ids, logits.clone())
            rows.append(torch.log_softmax(logits, -1))
    return rows


class Ban(LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, token_ids, logits):
        logits[self.token] = float("-inf")
        return logits


@pytest.mark.parametrize("n_top", [0, 3])
def test_logprobs_match_hf(model, cm, n_top):
    prompt = [5, 17, 33, 2]
    out = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=6, ignore_eos=True, logprobs=n_top))[0]
    comp = out.outputs[0]
    assert comp.token_ids == out.output_ids and comp.index == 0 and comp.finish_reason == "length"
    ref = _hf_logprobs(model, prompt, out.output_ids)
    assert len(comp.logprobs) == 6
    for tok, entry, lp in zip(out.output_ids, comp.logprobs, ref):
        assert list(entry)[0] == tok  # the sampled token first
        assert entry[tok] == pytest.approx(lp[tok].item(), abs=1e-4)
        if n_top:
            top = torch.topk(lp, n_top)
            assert set(entry) == set(top.indices.tolist()) | {tok}  # greedy: the sampled token is the top-1
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[t] == pytest.approx(v, abs=1e-4)
        else:
            assert len(entry) == 1
    assert comp.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.output_ids, comp.logprobs)))


def test_logprobs_are_before_temperature_and_after_processors(model, cm):
    prompt = [9, 8, 7]
    greedy = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=1, ignore_eos=True))[0].output_ids[0]
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.7, top_k=5, seed=3, ignore_eos=True, logprobs=2,
                         logits_processors=[Ban(greedy)])
    out = Engine(cm).generate([prompt], cfg)[0]
    ref = _hf_logprobs(model, prompt, out.output_ids, processor=Ban(greedy))
    for tok, entry, lp in zip(out.output_ids, out.outputs[0].logprobs, ref):
        assert entry[tok] == pytest.approx(lp[tok].item(), abs=1e-4)  # untempered, with the ban applied
        assert greedy not in entry or entry[greedy] == -math.inf
    # seeded: the same tokens as without logprobs (asking for logprobs does not change sampling)
    plain = SamplingConfig(max_new_tokens=5, temperature=1.7, top_k=5, seed=3, ignore_eos=True,
                           logits_processors=[Ban(greedy)])
    assert Engine(cm).generate([prompt], plain)[0].output_ids == out.output_ids


def test_logprobs_none_and_mixed_batch(cm):
    cfgs = [SamplingConfig(max_new_tokens=4, ignore_eos=True),
            SamplingConfig(max_new_tokens=4, ignore_eos=True, logprobs=1),
            SamplingConfig(max_new_tokens=4, temperature=1.0, n=2, seed=1, ignore_eos=True, logprobs=0)]
    outs = Engine(cm).generate([[1, 2], [1, 2], [3, 4]], cfgs)
    assert outs[0].outputs[0].logprobs is None and outs[0].outputs[0].cumulative_logprob is None
    assert outs[0].output_ids == outs[1].output_ids  # logprobs do not change greedy tokens
    assert all(len(e) <= 2 for e in outs[1].outputs[0].logprobs)
    assert len(outs[2].outputs) == 2
    for comp in outs[2].outputs:
        assert [list(e) for e in comp.logprobs] == [[t] for t in comp.token_ids]
        assert all(v <= 0 for e in comp.logprobs for v in e.values())


def test_stream_events_carry_logprobs(cm):
    engine = Engine(cm)
    service = EngineService(engine)
    events = list(service.submit([1, 2, 3], SamplingConfig(max_new_tokens=4, ignore_eos=True, logprobs=2)))
    service.shutdown()
    out = events[-1].output
    assert [e.token_id for e in events] == out.output_ids
    for ev, entry in zip(events, out.outputs[0].logprobs):
        assert ev.logprob == entry[ev.token_id] and len(ev.top_logprobs) == 2
        assert set(ev.top_logprobs) <= set(entry)
    plain = list(EngineService(Engine(cm)).submit([1, 2, 3], SamplingConfig(max_new_tokens=2, ignore_eos=True)))
    assert all(e.logprob is None and e.top_logprobs is None for e in plain)


def test_min_tokens_suppresses_stops(cm):
    prompt = [11, 12, 13]
    base = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=10, ignore_eos=True))[0].output_ids
    stop = base[1]
    early = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=10, stop_token_ids=[stop]))[0]
    assert early.output_ids == base[:base.index(stop) + 1] and early.finish_reason == "stop"
    cfg = SamplingConfig(max_new_tokens=10, stop_token_ids=[stop], min_tokens=6, logprobs=1)
    out = Engine(cm).generate([prompt], cfg)[0]
    assert len(out.output_ids) >= 6 and stop not in out.output_ids[:6]
    assert out.output_ids[:base.index(stop)] == base[:base.index(stop)]
    for entry in out.outputs[0].logprobs[:6]:  # banned while too short: not even among the top logprobs
        assert entry.get(stop, -math.inf) == -math.inf

    class StopNow(StoppingCriteria):
        def __call__(self, token_ids, new_token):
            return True

    out = Engine(cm).generate([prompt], SamplingConfig(max_new_tokens=10, min_tokens=4, ignore_eos=True,
                                                       stopping_criteria=[StopNow()]))[0]
    assert len(out.output_ids) == 4 and out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,field", [
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(logprobs=1.5), "logprobs"),
    (dict(logprobs=True), "logprobs"), (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_new_tokens=10), "min_tokens"), (dict(beam_width=2, logprobs=1), "logprobs"),
    (dict(beam_width=2, min_tokens=1), "min_tokens"), (dict(temperature=-1), "temperature"),
])
def test_invalid_values_fail_at_construction(kwargs, field):
    with pytest.raises(autodeploy.SamplingConfigError, match=f"SamplingConfig.{field}="):
        SamplingConfig(**kwargs)


def test_plain_greedy_hot_path_untouched(cm, monkeypatch):
    """Requests without logprobs/min_tokens/processors stay on the one-argmax path; asking moves only them."""
    engine = Engine(cm)
    plain = engine.add_request([1, 2], SamplingConfig(max_new_tokens=3, ignore_eos=True))
    asks = engine.add_request([1, 2], SamplingConfig(max_new_tokens=3, ignore_eos=True, logprobs=0))
    assert plain.plain_greedy and not asks.plain_greedy
    engine.run_until_done()
    only_plain = Engine(cm)

    def no_sampler(*a, **kw):
        raise AssertionError("the sampler ran for a plain greedy batch")

    monkeypatch.setattr(only_plain.sampler, "sample", no_sampler)
    assert len(only_plain.generate([[1, 2], [3]], SamplingConfig(max_new_tokens=3, ignore_eos=True))[0].output_ids) == 3
