"""Repetition / frequency / presence penalties on the device path (runtime/penalty_state.py and the fused
sampling kernel): the engine keeps penalized requests on the asynchronous path and gives them exactly the
tokens of the host path (penalties from ``token_ids`` in torch), across batches, slot reuse, host-path steps
in between and preemption with recomputation."""

from __future__ import annotations

import os
import random

import pytest
import torch

import autodeploy
from autodeploy import SamplingConfig
from autodeploy.backends.triton.kernels import sampling as S
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.hooks import LogitsProcessor
from autodeploy.runtime.penalty_state import PenaltyState
from autodeploy.runtime.request import SeqState
from helpers import drive
from model_zoo import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=11)


@pytest.fixture(scope="module")
def cm(model):
    return autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, max_num_tokens=64)


class _Noop(LogitsProcessor):
    """Forces the host-assisted sampler path (penalties from token_ids) without changing any logit."""

    def __call__(self, token_ids, logits):
        return logits


def _cfg(n_new=12, **kw):
    return SamplingConfig(max_new_tokens=n_new, ignore_eos=True, **kw)


def _hosted(cfg):
    import dataclasses

    return dataclasses.replace(cfg, logits_processors=[_Noop()])


PROMPTS = [[3, 4, 5, 3], [9, 9, 1, 2], [7], [1, 2, 3, 4, 5, 6]]
GREEDY = [_cfg(repetition_penalty=1.5), _cfg(frequency_penalty=0.8, presence_penalty=0.5),
          _cfg(repetition_penalty=0.7, frequency_penalty=-0.3, presence_penalty=1.0), _cfg()]


def _device_engine(cm, **kw):
    """An engine that fails the test if a penalized batch reaches the host sampler."""
    engine = Engine(cm, async_scheduling=True, **kw)
    calls = []
    real = engine.sampler.sample
    engine.sampler.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    return engine, calls


def test_greedy_penalties_stay_on_the_async_path_and_equal_the_host_path(cm):
    engine, calls = _device_engine(cm)
    got = engine.generate(PROMPTS, GREEDY)
    assert not calls, "penalized requests went through the host sampler"
    assert engine.stats.num_async_steps > 0, "no step was launched ahead"
    host = Engine(cm).generate(PROMPTS, [_hosted(c) for c in GREEDY])
    assert [o.output_ids for o in got] == [o.output_ids for o in host]
    plain = Engine(cm).generate(PROMPTS[:3], [_cfg()] * 3)
    assert all(o.output_ids != p.output_ids for o, p in zip(got[:3], plain)), "a penalty changed nothing"
    assert engine._penalties.dtype == torch.int16  # max_seq_len 64: every count fits int16 exactly
    assert engine.kv.all_free()


def test_greedy_repetition_penalty_matches_hf(model, cm):
    prompt = [5, 6, 7, 5, 6]
    got = Engine(cm, async_scheduling=True).generate([prompt], _cfg(n_new=10, repetition_penalty=1.4))[0]
    gen = model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = None
    try:
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             repetition_penalty=1.4, pad_token_id=0)[0, len(prompt):].tolist()
    finally:
        gen.eos_token_id = saved
    assert got.output_ids == ref


def test_seeded_sampled_penalties_reproduce_across_batches_and_paths(cm):
    cfg = _cfg(temperature=0.9, top_k=30, seed=77, repetition_penalty=1.3, frequency_penalty=-2.0,
               presence_penalty=-1.0)
    alone = Engine(cm, async_scheduling=True).generate([[3, 4, 5]], cfg)[0].output_ids
    others = [_cfg(n_new=9, temperature=1.2, seed=s, presence_penalty=0.5 * s) for s in range(3)]
    engine, calls = _device_engine(cm)
    mixed = drive(engine, [(0, [9, 9], others[0]), (2, [3, 4, 5], cfg), (0, [1] * 7, others[1]),
                           (4, [2, 3], others[2])])
    assert mixed[1].output_ids == alone and not calls
    assert Engine(cm).generate([[3, 4, 5]], _hosted(cfg))[0].output_ids == alone
    assert Engine(cm).generate([[3, 4, 5]], _cfg(temperature=0.9, top_k=30, seed=77))[0].output_ids != alone


def test_slot_reuse_does_not_leak_counts(cm):
    engine = Engine(cm, async_scheduling=True)
    a = engine.generate([[8, 8, 8, 9]], _cfg(n_new=16, repetition_penalty=2.0, frequency_penalty=1.0))[0]
    pen = engine._penalties
    assert pen.num_rows == 1
    b_cfg = _cfg(n_new=12, repetition_penalty=1.5, presence_penalty=0.7)
    b = engine.generate([[20, 21]], b_cfg)[0]
    assert engine._penalties is pen and pen.num_rows == 1, "the row was not reused"
    assert pen.num_rebuilds == 2  # each request wrote its row once, at admission
    assert b.output_ids == Engine(cm).generate([[20, 21]], _hosted(b_cfg))[0].output_ids
    assert set(a.output_ids) & set(b.output_ids), "the case cannot show a leak (no token in common)"


def test_host_path_steps_in_between_rebuild_the_row(cm):
    """A request asking for logprobs joins later and forces the host path on its batch for a few steps; the
    penalized request then returns to the device path with its row rebuilt from its tokens."""
    pen_cfg = _cfg(n_new=16, repetition_penalty=1.6, frequency_penalty=0.3)
    engine = Engine(cm, async_scheduling=True)
    got = drive(engine, [(0, [3, 4, 5, 3], pen_cfg), (4, [9, 9], _cfg(n_new=4, logprobs=1))])
    assert engine._penalties.num_rebuilds == 2  # at admission, and after the host-path steps
    assert engine.stats.num_async_steps > 0
    assert got[0].output_ids == Engine(cm).generate([[3, 4, 5, 3]], _hosted(pen_cfg))[0].output_ids


def test_preemption_and_recompute_give_the_same_tokens(model, cm):
    rng = random.Random(3)
    prompts = [[rng.randrange(128) for _ in range(rng.randint(8, 20))] for _ in range(4)]
    cfgs = [_cfg(n_new=16, repetition_penalty=1.3 + 0.1 * i, frequency_penalty=0.2 * (i % 3)) for i in range(4)]
    ref = Engine(cm).generate(prompts, [_hosted(c) for c in cfgs])  # roomy: no preemption
    tight = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=10)
    engine = Engine(tight, async_scheduling=True)
    got = engine.generate(prompts, cfgs)
    assert engine.stats.num_preemptions > 0, "the cache was meant to be too small for the load"
    assert engine._penalties.num_rebuilds > len(prompts), "no recomputed sequence rebuilt its row"
    assert [o.output_ids for o in got] == [o.output_ids for o in ref]
    assert all(o.error is None for o in got) and engine.kv.all_free()


def test_state_is_lazy_and_freed_when_idle(cm):
    engine = Engine(cm, async_scheduling=True)
    engine.generate([[1, 2]], _cfg(n_new=4, temperature=1.0, seed=1))
    assert engine._penalties is None, "allocated without a penalized request"
    engine.generate([[1, 2]], _cfg(n_new=4, repetition_penalty=1.2))
    assert engine._penalties.tensor is not None
    engine.generate([[1, 2]], _cfg(n_new=4, temperature=1.0, seed=1))
    assert engine._penalties.tensor is None and engine._penalties.nbytes == 0


@pytest.mark.skipif(not S._HAS_TRITON, reason="needs Triton (the interpreter on CPU)")
def test_engine_penalties_through_the_kernel(cm, monkeypatch):
    """The engine's state rows and parameters drive the Triton kernel (interpreted here) to the host path's
    tokens, greedy and sampled rows, penalized or not, with the state updated by the kernel alone."""
    import autodeploy.runtime.engine as engine_mod

    cfgs = [GREEDY[0], _cfg(n_new=8, temperature=0.8, seed=4, presence_penalty=1.0, top_p=0.9), GREEDY[3]]
    launches = []
    monkeypatch.setattr(engine_mod, "sample_rows", lambda lg, prm, host_out=None, **kw: launches.append(
        kw.get("penalties") is not None) or S.fused_sample(lg, prm, host_out, **kw))
    got = Engine(cm, async_scheduling=True).generate(PROMPTS[:3], cfgs)
    assert any(launches)
    monkeypatch.undo()
    host = Engine(cm).generate(PROMPTS[:3], [_hosted(c) for c in cfgs])
    assert [o.output_ids for o in got] == [o.output_ids for o in host]


# ------------------------------------------------------------------------------------- PenaltyState


class _FakeSeq:
    _n = 0

    def __init__(self, tokens, prompt_len):
        _FakeSeq._n += 1
        self.seq_id, self.token_ids, self.prompt_len, self.state = _FakeSeq._n, tokens, prompt_len, SeqState.RUNNING


def test_penalty_state_rows_rebuild_and_reclaim():
    pen = PenaltyState(16, "cpu", max_count=100000)
    assert pen.dtype == torch.int32 and pen.tensor is None
    a, b = _FakeSeq([1, 2, 2], 2), _FakeSeq([3], 1)
    rows = pen.assign([a, b], [3, 1], [True, True])
    assert sorted(rows) == [0, 1] and pen.num_rebuilds == 2
    assert pen.tensor[rows[0]].tolist()[:4] == [0, 1, 3, 0]  # 1: prompt; 2: prompt and generated once
    assert pen.in_sync(a, 4) and not pen.in_sync(a, 3)
    a.token_ids.append(5)
    assert pen.assign([a], [4], [True]) == [rows[0]] and pen.num_rebuilds == 2  # in sync: no rebuild
    pen.invalidate([a])
    a.token_ids.append(5)
    pen.assign([a], [5], [True])
    assert pen.num_rebuilds == 3 and int(pen.tensor[rows[0], 5]) == 4
    with pytest.raises(RuntimeError, match="stale"):  # a rebuild needs the whole context on the host
        pen.assign([b], [5], [True])
    b.state = SeqState.FINISHED
    c = _FakeSeq([7, 7], 2)
    assert pen.assign([a, c], [6, 2], [True, True])[1] == rows[1] and pen.num_rows == 2  # b's row reclaimed
    d = _FakeSeq([9], 1)
    pen.assign([d], [1], [True])
    assert pen.num_rows == 4 and int(pen.tensor[rows[0], 5]) == 4  # grown by doubling, rows kept
    assert pen.assign([d, a], [1, 7], [False, True]) == [-1, rows[0]]


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled Triton kernels only")
def test_gpu_engine_penalties_async_equal_host_path():
    """On the GPU (compiled kernel, CUDA graphs, pinned parameters): penalized greedy and sampled requests stay
    on the asynchronous path and give exactly the host path's tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    cm = autodeploy.compile(m.eval(), max_batch_size=8, max_seq_len=512, lowering="cudagraph")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 32000, (int(torch.randint(3, 60, (1,), generator=g)),), generator=g).tolist()
               for _ in range(8)]
    cfgs = [_cfg(n_new=40, repetition_penalty=1.3 + 0.1 * i, frequency_penalty=0.3 * (i % 3),
                 presence_penalty=-0.5 * (i % 2), temperature=0.0 if i % 2 else 0.9, top_p=0.95, seed=i)
            for i in range(7)] + [_cfg(n_new=30)]
    engine, calls = _device_engine(cm)
    got = engine.generate(prompts, cfgs)
    assert not calls and engine.stats.num_async_steps > 0
    host = Engine(cm, async_scheduling=True).generate(prompts, [_hosted(c) for c in cfgs])
    assert [o.output_ids for o in got] == [o.output_ids for o in host]
    assert engine.kv.all_free()
