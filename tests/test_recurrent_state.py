"""Per-sequence recurrent state (autodeploy/ops/mixers/, runtime/state_slots.py): slot bookkeeping, the cached
mixer ops against their references, and hybrid families end to end against HF eager."""

import pytest
import torch

import autodeploy
from autodeploy.errors import CacheCapacityError, InvalidRequestError, UnsupportedModelError
from autodeploy.metadata import SequenceChunk, nest_sequences
from autodeploy.ops.mixers.causal_conv import cached_causal_conv1d_reference, causal_conv1d_reference
from autodeploy.ops.mixers.ssm import cached_ssm_scan_reference, ssm_scan_reference
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.kv_cache import KVCacheManager
from autodeploy.runtime.sampling import SamplingConfig
from autodeploy.runtime.state_slots import StateSlotAllocator
from helpers import assert_mixed_batch_matches_hf, drive, hf_greedy
from helpers import WithSlots as _WithSlots
from helpers import assert_greedy_matches_hf, assert_no_cross_talk, assert_stateful_matches_hf_on_gpu
from model_zoo import STATEFUL_FAMILIES, make_model

# 32 pages: the mixed-batch helper's page ids stay below it, and 4 requests of 32-38 tokens outgrow it (preemption).
KW = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=32)
_COMPILED = {}


def _compiled(family):
    """One compile per family for the whole module (compiles dominate this file's time)."""
    if family not in _COMPILED:
        model = make_model(family, "eager", tie_word_embeddings=False)
        _COMPILED[family] = model, autodeploy.compile(model, **KW)  # prefix caching asked for (the default)
    return _COMPILED[family]


# -- slots ---------------------------------------------------------------------------------------------------------
def test_slot_allocation_free_and_backpressure():
    slots = StateSlotAllocator(2)
    a, b = slots.allocate("a"), slots.allocate("b")
    assert {a, b} == {0, 1} and slots.num_free == 0
    with pytest.raises(CacheCapacityError, match="no recurrent-state slot"):
        slots.allocate("c")
    slots.free("a")
    assert slots.allocate("c") == a  # reused: the cached ops start a sequence at position 0 from a zero state
    slots.free("b"), slots.free("c")
    assert slots.all_free()
    slots.check_invariants()


def test_slot_refuses_a_step_that_does_not_continue_its_state():
    slots = StateSlotAllocator(1)
    slots.allocate("a")
    assert slots.advance("a", 0, 5) == 0 and slots.consumed("a") == 5
    slots.advance("a", 5, 1)
    with pytest.raises(RuntimeError, match="holds 6 tokens"):
        slots.advance("a", 5, 1)  # the same token twice would update the state twice
    slots.advance("a", 0, 3)  # a restart from position 0 is always consistent


def test_kv_manager_takes_and_frees_a_slot_with_the_pages():
    kv = KVCacheManager(8, 4, enable_prefix_caching=False, state_slots=StateSlotAllocator(1))
    assert kv.can_allocate([1, 2, 3])
    kv.allocate("a", [1, 2, 3])
    assert kv.state_slot("a", 0, 3) == 0 and kv.state_matches("a", 3) and not kv.state_matches("a", 0)
    assert not kv.can_allocate([4]), "no slot left must be backpressure, like full pages"
    with pytest.raises(CacheCapacityError):
        kv.allocate("b", [4])
    assert "b" not in kv and kv.num_free_pages == 7  # nothing changed
    with pytest.raises(NotImplementedError, match="recurrent state"):
        kv.fork("a", "a2")
    kv.free("a")
    kv.check_all_free()
    with pytest.raises(ValueError, match="prefix caching"):
        KVCacheManager(8, 4, enable_prefix_caching=True, state_slots=StateSlotAllocator(1))


def test_packed_state_slots_follow_the_packed_order():
    chunks = [SequenceChunk([1], 4, [1, 2], state_slot=3), SequenceChunk([1, 2, 3], 0, [3], state_slot=1)]
    batch = nest_sequences(chunks, 4, state_slots=True)
    assert batch.order == [1, 0] and batch.inputs["state_slots"].tolist() == [1, 3]
    assert nest_sequences([SequenceChunk([5], 2, [1], state_slot=2)], 4, state_slots=True
                          ).inputs["state_slots"].tolist() == [2]
    assert "state_slots" not in nest_sequences(chunks, 4).inputs


def test_backend_state_layout_contract():
    """The default layout: ``[slots, *shape]`` per layer; copy and reset by slot index."""
    from autodeploy.backends import get_backend
    from autodeploy.backends.base import StateSpec

    backend = get_backend("torch")
    spec = StateSpec(layer=0, kind="ssm_scan", shape=(2, 3, 4), dtype=torch.float32)
    state = backend.allocate_state(3, spec, torch.device("cpu"))
    assert state.shape == (3, 2, 3, 4) and backend.state_bytes_per_slot(spec) == 2 * 3 * 4 * 4
    state[0] = 1.0
    backend.copy_state(state, torch.tensor([0]), torch.tensor([2]))
    assert bool((state[2] == 1).all()) and bool((state[1] == 0).all())
    backend.reset_state(state, torch.tensor([0, 2]))
    assert not state.any()
    assert backend.cached_mixer_op("causal_conv1d") is torch.ops.autodeploy.cached_causal_conv1d.default


# -- ops -----------------------------------------------------------------------------------------------------------
def _split_steps(lengths, cuts):
    """Per step, ``(seq, start, n)`` chunks: each sequence's tokens cut at ``cuts[seq]`` (prefill chunks then
    one-token decodes), prefill chunks first within a step, as the packer orders them."""
    pieces = {s: [(a, b - a) for a, b in zip([0] + c, c + [n])] for s, (n, c) in enumerate(zip(lengths, cuts))}
    steps = []
    for i in range(max(len(p) for p in pieces.values())):
        step = [(s, *p[i]) for s, p in pieces.items() if i < len(p)]
        steps.append(sorted(step, key=lambda x: x[2] == 1))
    return steps


def _run_cached(op, per_token, states, steps, slots, **kw):
    """Drive a cached op over ``steps`` and return each sequence's outputs, concatenated in position order."""
    out = {s: [] for s in slots}
    for step in steps:
        cu = torch.tensor([0] + [n for _, _, n in step]).cumsum(0).to(torch.int32)
        kv = torch.tensor([start + n for _, start, n in step], dtype=torch.int32)
        sl = torch.tensor([slots[s] for s, _, _ in step], dtype=torch.int32)
        args = [torch.cat([t[s][start:start + n] for s, start, n in step]).unsqueeze(0) for t in per_token]
        y = op(*args, **kw, state=states, cu_seqlens_q=cu, seq_lens_kv=kv, state_slots=sl)[0]
        for (s, _, n), part in zip(step, y.split([n for _, _, n in step])):
            out[s].append(part)
    return {s: torch.cat(v) for s, v in out.items()}


def test_causal_conv_reference_and_cached_op_across_chunks():
    g = torch.Generator().manual_seed(0)
    C, K = 6, 4
    w, b = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    xs = [torch.randn(n, C, generator=g) for n in (9, 7)]
    # canonical reference = a zero-padded causal depthwise conv
    ref = [torch.nn.functional.conv1d(x.T[None], w[:, None], b, padding=K - 1, groups=C)[0, :, :len(x)].T for x in xs]
    for x, r in zip(xs, ref):
        torch.testing.assert_close(causal_conv1d_reference(x[None], w, b)[0], r)
    # chunked prefill (sequence 0 in 2 chunks, then decodes; sequence 1 in 3 pieces) with stale slot contents
    state = torch.randn(4, K - 1, C, generator=g)
    got = _run_cached(cached_causal_conv1d_reference, [xs], state, _split_steps([9, 7], [[2, 6, 7, 8], [1, 5, 6]]),
                      {0: 2, 1: 0}, weight=w, bias=b, activation="silu")
    for s in (0, 1):
        torch.testing.assert_close(got[s], torch.nn.functional.silu(ref[s]))
        torch.testing.assert_close(state[{0: 2, 1: 0}[s]], xs[s][-(K - 1):])  # the last K-1 inputs


@pytest.mark.parametrize("chunk", [64, 3])
def test_ssm_scan_reference_and_cached_op_across_chunks(chunk, monkeypatch):
    """``chunk``: the reference's block size (3: blocks end inside prefill chunks, state handed between blocks)."""
    monkeypatch.setattr("autodeploy.ops.mixers.ssm.CHUNK", chunk)
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    g = torch.Generator().manual_seed(0)
    H, P, G, N, L = 4, 3, 2, 5, 10
    x, dt = torch.randn(1, L, H, P, generator=g), torch.rand(1, L, H, generator=g)
    A = -torch.rand(H, generator=g) - 0.5
    B, C = torch.randn(1, L, G, N, generator=g), torch.randn(1, L, G, N, generator=g)
    # against the recurrence token by token, and against HF's chunked SSD (an independent implementation)
    h, loop = torch.zeros(H, P, N), []
    for t in range(L):
        bt, ct = (v[0, t].repeat_interleave(H // G, dim=0) for v in (B, C))
        h = h * torch.exp(dt[0, t] * A)[:, None, None] + (dt[0, t, :, None] * x[0, t])[..., None] * bt[:, None, :]
        loop.append(h @ ct[..., None])
    torch.testing.assert_close(ssm_scan_reference(x, dt, A, B, C)[0], torch.stack(loop)[..., 0])
    hf = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=4)
    torch.testing.assert_close(ssm_scan_reference(x, dt, A, B, C), hf, rtol=1e-5, atol=1e-5)
    state = torch.randn(3, H, P, N, generator=g)
    per_token = [t[0] for t in (x, dt, B, C)]
    per_token = [[t, t[:7]] for t in per_token]  # sequence 1: the first 7 tokens of the same inputs
    got = _run_cached(lambda x, dt, B, C, **kw: cached_ssm_scan_reference(x, dt, A, B, C, **kw), per_token, state,
                      _split_steps([L, 7], [[3, 8, 9], [4, 5, 6]]), {0: 1, 1: 2})
    torch.testing.assert_close(got[0], hf[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ssm_scan_reference(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7])[0])


# -- families end to end ---------------------------------------------------------------------------------------------


def _prompts(n, lengths=(9, 11, 6)):
    g = torch.Generator().manual_seed(n)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in lengths]


def _greedy(n=6):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("family", STATEFUL_FAMILIES)
def test_hybrid_family_matches_hf(family):
    """Mixed batches (prefill + decode, a prompt over two steps, three sequences), then greedy through the engine
    with chunked prefill (5-token budget) and two requests in flight: identical to HF."""
    model, cm = _compiled(family)
    assert cm.state_specs and not cm.enable_prefix_caching
    assert_mixed_batch_matches_hf(_WithSlots(cm), model, _prompts(1), family)
    engine = Engine(cm, max_num_tokens=5)
    prompts = _prompts(2, (11, 8))
    outs = drive(engine, [(0, prompts[0], _greedy()), (1, prompts[1], _greedy())])
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(model, p, 6), family
    engine.kv.check_all_free()


def test_sequences_in_one_step_do_not_contaminate_each_other():
    """Two sequences prefill together, then continue together: each continues from its own state only."""
    model, cm = _compiled("bamba")
    assert_no_cross_talk(cm, model, *_prompts(3, (12, 10)))


def test_preemption_recomputes_the_same_tokens():
    """32 pages of 4 tokens for 4 requests growing to 32-38 tokens: the scheduler preempts, the preempted request
    takes a slot again and restarts from a zero state."""
    model, cm = _compiled("bamba")
    assert_greedy_matches_hf(Engine(cm), model, _prompts(4, (24, 20, 22, 26)), 12, preempts=True)


def test_slots_freed_on_finish_and_abort_and_backpressure():
    """4 slots, an engine that would batch 6: the extra requests wait for a slot; finished and aborted requests
    give theirs back."""
    model, cm = _compiled("lfm2")
    engine = Engine(cm, max_batch_size=6)
    slots = engine.kv.state_slots
    assert slots.num_slots == 4
    prompts = _prompts(5, (7, 6, 9, 5, 4, 6))
    reqs = [engine.add_request(p, _greedy(5)) for p in prompts]
    engine.step()
    assert slots.num_free == 0 and len(engine.scheduler.running) == 4 and len(engine.scheduler.waiting) == 2
    engine.abort(reqs[0].request_id)
    assert slots.num_free == 1
    engine.run_until_done()
    assert slots.all_free() and engine.kv.all_free()
    for p, r in zip(prompts[1:], reqs[1:]):
        assert engine.output(r).output_ids == hf_greedy(model, p, 5)
    with pytest.raises(InvalidRequestError, match="stateful"):
        engine.add_request(prompts[0], SamplingConfig(max_new_tokens=2, n=2, temperature=1.0))
    with pytest.raises(UnsupportedModelError, match="stateful"):
        cm.save("/nonexistent/engine")


def test_interrupted_step_recomputes_instead_of_reapplying_state(monkeypatch):
    """A forward that ran (the state slots advanced) but whose step was interrupted before its tokens were
    committed: running the same tokens again would apply them to the state twice. The engine's repair sees the
    state ahead of the committed tokens and requeues the requests (recomputed from position 0)."""
    model, cm = _compiled("lfm2")
    engine = Engine(cm)
    prompts = _prompts(7, (9, 7))
    reqs = [engine.add_request(p, _greedy(6)) for p in prompts]
    engine.step(), engine.step()
    real, calls = cm.forward, []

    def ran_then_interrupted(batch):
        out = real(batch)
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(cm, "forward", ran_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    engine.run_until_done()
    for p, r in zip(prompts, reqs):
        assert engine.output(r).output_ids == hf_greedy(model, p, 6)
    engine.kv.check_all_free()


def test_prefix_caching_never_reuses_stateless_pages():
    """A shared 8-token prefix (two full pages): with prefix reuse the second request would skip the tokens whose
    conv state nothing stored. Compiled with prefix caching on (the default), the stateful model turns it off."""
    model, cm = _compiled("lfm2")
    assert not cm.enable_prefix_caching and "prefix caching off" in cm.explain()
    engine = Engine(cm)
    prefix = _prompts(6, (8,))[0]
    prompts = [prefix + [3, 4, 5], prefix + [9, 10]]
    outs = drive(engine, [(0, prompts[0], _greedy(4)), (3, prompts[1], _greedy(4))])
    assert engine.kv.usage()["prefix_hit_tokens"] == 0
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(model, p, 4)


def test_unverified_mixer_form_stays_refused(monkeypatch):
    """A mixer whose configuration the rewrite has not verified keeps HF's forward, and the check refuses it."""
    from autodeploy.models.stateful import MIXER_REWRITES, MixerRewrite
    from autodeploy.passes.check_sequence_mixers import SequenceMixerError

    old = MIXER_REWRITES["Lfm2ShortConv"]
    monkeypatch.setitem(MIXER_REWRITES, "Lfm2ShortConv", MixerRewrite(old.module_class, lambda m: "test", old.forward))
    with pytest.raises(SequenceMixerError, match=r"layers\.0\.conv"):
        autodeploy.compile(make_model("lfm2", "eager"), **KW)


def test_engine_backends_refuse_stateful_models():
    """onnxruntime lowers the whole graph to an engine with no state slots: refused, naming the cause."""
    with pytest.raises(UnsupportedModelError, match="carries no recurrent state"):
        autodeploy.compile(make_model("lfm2", "eager"), **KW, backend="onnxruntime")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lfm2", "bamba", "falcon_h1"])
def test_hybrid_family_on_gpu(family):
    """On CUDA (fp32): the chosen attention backend (triton) with the torch-reference mixer ops, the CUDA-graph
    lowering falling back to eager with the reason, asynchronous scheduling on: mixed batches and greedy match HF
    (eager, on the CPU, same weights)."""
    import copy

    ref = make_model(family, "eager", tie_word_embeddings=False)
    cm = autodeploy.compile(copy.deepcopy(ref).to("cuda"), **KW)
    assert cm.report.lowering == "eager" and "stateful mixer ops" in cm.report.lowering_reason
    engine = Engine(cm, max_num_tokens=5)
    assert engine.async_scheduling
    assert_stateful_matches_hf_on_gpu(cm, engine, ref, _prompts(1), _prompts(2, (11, 8, 13)))
