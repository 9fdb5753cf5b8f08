"""Asynchronous scheduling (the next decode step launched before the host reads the current tokens) must give
exactly the outputs of the synchronous loop: same tokens, same finish reasons, no lost request, no leaked page,
with early stops (EOS one step late), waiting requests, preemption and requests that force synchronous steps."""

import random

import pytest

import autodeploy
from autodeploy import SamplingConfig
from autodeploy.runtime.engine import Engine
from helpers import drive
from model_zoo import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=11)


@pytest.fixture(scope="module")
def cm(model):
    return autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, max_num_tokens=64)


def _compare(cm, arrivals):
    sync_engine = Engine(cm, async_scheduling=False)
    sync = drive(sync_engine, arrivals)
    async_engine = Engine(cm, async_scheduling=True)
    got = drive(async_engine, arrivals)
    for i, (a, b) in enumerate(zip(sync, got)):
        assert b.samples == a.samples, f"request {i}: async tokens differ"
        assert b.finish_reason == a.finish_reason, f"request {i}: {b.finish_reason} != {a.finish_reason}"
        assert b.error == a.error
    assert async_engine.kv.all_free() and sync_engine.kv.all_free()
    assert async_engine.stats.num_async_steps > 0, "no step was launched ahead: the test proves nothing"
    return sync, async_engine


def _stop_tokens_from(cm, prompts, cfg):
    """A token each prompt's greedy continuation emits mid-way, so a stop on it ends the request early."""
    outs = Engine(cm, async_scheduling=False).generate(prompts, cfg)
    return [o.output_ids[len(o.output_ids) // 2] for o in outs]


def test_async_equals_sync_mixed_stream(cm):
    rng = random.Random(3)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(1, 30))] for _ in range(14)]
    stops = _stop_tokens_from(cm, prompts, SamplingConfig(max_new_tokens=20, ignore_eos=True))
    arrivals = []
    for i, p in enumerate(prompts):
        kind = i % 4
        if kind == 0:  # greedy, stopped early by a stop token (EOS-like: known only after the token arrives)
            cfg = SamplingConfig(max_new_tokens=20, stop_token_ids=[stops[i]], ignore_eos=True)
        elif kind == 1:  # seeded sampling: the per-request generator must see the same draws
            cfg = SamplingConfig(max_new_tokens=rng.randint(1, 18), temperature=0.9, top_k=20, seed=i)
        elif kind == 2:  # length-limited greedy
            cfg = SamplingConfig(max_new_tokens=rng.randint(1, 25), ignore_eos=True)
        else:  # runs into max_seq_len
            cfg = SamplingConfig(max_new_tokens=200, ignore_eos=True)
        arrivals.append((rng.randint(0, 30), p, cfg))
    sync, engine = _compare(cm, arrivals)
    assert {o.finish_reason for o in sync} >= {"stop", "length", "max_seq_len"}


def test_async_with_sync_only_requests_and_n_samples(cm):
    """Penalties (on the device), beams and n>1 samples share the batch: beam steps run synchronously, the rest
    async; every output equals the synchronous engine's."""
    rng = random.Random(4)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(3, 12))] for _ in range(6)]
    cfgs = [SamplingConfig(max_new_tokens=12, ignore_eos=True),
            SamplingConfig(max_new_tokens=10, repetition_penalty=1.3, ignore_eos=True),
            SamplingConfig(max_new_tokens=8, n=2, temperature=1.0, seed=7),
            SamplingConfig(max_new_tokens=6, beam_width=2, ignore_eos=True),
            SamplingConfig(max_new_tokens=16, ignore_eos=True),
            SamplingConfig(max_new_tokens=14, ignore_eos=True)]
    _compare(cm, [(0, p, c) for p, c in zip(prompts, cfgs)] + [(30, prompts[0], cfgs[0])])


def test_async_under_preemption(model):
    rng = random.Random(5)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(8, 20))] for _ in range(8)]
    tight = autodeploy.compile(model, max_batch_size=8, max_seq_len=64, page_size=4, num_pages=16)
    cfg = SamplingConfig(max_new_tokens=24, ignore_eos=True)
    _, engine = _compare(tight, [(0, p, cfg) for p in prompts])
    assert engine.stats.num_preemptions > 0
