"""Jamba (Mamba-1 mixers next to attention and MoE layers): the selective-scan mixer kind
(autodeploy/ops/mixers/selective_scan.py) against the recurrence, and the model end to end against HF eager (fp32):
mixed batches, a prompt prefilled over several steps, decodes, no cross-talk, preemption, the refused forms."""

import pytest
import torch

import autodeploy
from autodeploy.errors import UnsupportedModelError
from autodeploy.metadata import SequenceChunk
from autodeploy.ops.mixers.selective_scan import cached_selective_scan_reference, selective_scan_reference
from autodeploy.runtime.engine import Engine
from autodeploy.runtime.hooks import LogitsProcessor
from autodeploy.runtime.sampling import SamplingConfig
from helpers import (assert_mixed_batch_matches_hf, assert_no_cross_talk, assert_stateful_matches_hf_on_gpu,
                     drive, hf_greedy, rel_rms)
from helpers import WithSlots as _WithSlots
from model_zoo import STATEFUL_FAMILIES, make_model

# 32 pages of 4 tokens: 4 requests growing to 32-38 tokens outgrow them (preemption).
KW = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=32)
_COMPILED = {}


def _jamba(**kw):
    """The zoo's tiny Jamba with long-memory mixers: HF's init (``A = -[1..N]``, ``dt`` about 0.7) forgets within
    a few tokens, so a lost or stale state would barely move the logits. Slow decay rates and a larger mixer
    output make a state error move them far past the 1e-4 tolerance."""
    model = make_model("jamba", "eager", tie_word_embeddings=False, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            mixer = getattr(layer, "mamba", None)
            if mixer is not None:
                mixer.A_log.copy_(torch.log(torch.rand(mixer.A_log.shape, generator=g) * 0.3 + 0.02))
                mixer.out_proj.weight.mul_(3.0)
    return model


def _compiled():
    """One compile for the whole module (compiles dominate this file's time)."""
    if "jamba" not in _COMPILED:
        model = _jamba()
        _COMPILED["jamba"] = model, autodeploy.compile(model, **KW)
    return _COMPILED["jamba"]




def _prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (k,), generator=g).tolist() for k in lengths]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


# -- the op --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [256, 3])
def test_selective_scan_reference_and_cached_op_across_chunks(block, monkeypatch):
    """Against the recurrence channel by channel (and HF's own Mamba-1 scan where this transformers has it as a
    function); then the cached op over chunked prefills and decodes of two sequences, with stale slot contents
    and (``block`` 3) blocks ending mid-chunk."""
    monkeypatch.setattr("autodeploy.ops.mixers.selective_scan.BLOCK", block)
    g = torch.Generator().manual_seed(0)
    D, N, L = 6, 4, 11
    x, dt = torch.randn(1, L, D, generator=g), torch.rand(1, L, D, generator=g)
    A = -torch.rand(D, N, generator=g) - 0.2
    B, C = torch.randn(1, L, N, generator=g), torch.randn(1, L, N, generator=g)
    h, loop = torch.zeros(D, N), []
    for t in range(L):
        h = torch.stack([torch.exp(dt[0, t, d] * A[d]) * h[d] + dt[0, t, d] * x[0, t, d] * B[0, t] for d in range(D)])
        loop.append(torch.stack([h[d] @ C[0, t] for d in range(D)]))
    want, want_state = torch.stack(loop), h
    torch.testing.assert_close(selective_scan_reference(x, dt, A, B, C)[0], want)
    try:
        from transformers.models.jamba.modeling_jamba import mamba_selective_scan
    except ImportError:  # older transformers write the scan inline in the mixer's forward
        pass
    else:
        hf = mamba_selective_scan(x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2))
        torch.testing.assert_close(want, hf[0].T)

    state = torch.randn(3, D, N, generator=g)  # stale contents: a sequence at position 0 must not read them
    slots = {0: 2, 1: 0}
    seqs = {0: (x[0], dt[0], B[0], C[0]), 1: (x[0, :7] * 0.5, dt[0, :7], C[0, :7], B[0, :7])}
    # per step, (seq, start, n): seq 0 prefilled over 3 steps then 2 decodes; seq 1 over 2 steps then decodes
    steps = [[(0, 0, 4), (1, 0, 2)], [(0, 4, 3), (1, 2, 3)], [(0, 7, 2), (1, 5, 1)], [(1, 6, 1), (0, 9, 1)],
             [(0, 10, 1)]]
    got = {0: [], 1: []}
    for step in steps:
        cu = torch.tensor([0] + [n for _, _, n in step]).cumsum(0).to(torch.int32)
        kv = torch.tensor([start + n for _, start, n in step], dtype=torch.int32)
        sl = torch.tensor([slots[s] for s, _, _ in step], dtype=torch.int32)
        xs, dts, bs, cs = (torch.cat([seqs[s][i][start:start + n] for s, start, n in step])[None] for i in range(4))
        y = cached_selective_scan_reference(xs, dts, A, bs, cs, state, cu, kv, sl)[0]
        for (s, _, n), part in zip(step, y.split([n for _, _, n in step])):
            got[s].append(part)
    torch.testing.assert_close(torch.cat(got[0]), want)
    torch.testing.assert_close(state[slots[0]], want_state)
    torch.testing.assert_close(torch.cat(got[1]), selective_scan_reference(*(t[None] for t in seqs[1][:2]), A,
                                                                           *(t[None] for t in seqs[1][2:]))[0])


# -- the model -----------------------------------------------------------------------------------------------------
def test_jamba_runs_stateful():
    model, cm = _compiled()
    assert "jamba" in STATEFUL_FAMILIES
    assert sorted(s.kind for s in cm.state_specs) == ["causal_conv1d", "selective_scan"]
    assert not cm.enable_prefix_caching
    assert "JambaMambaMixer -> canonical mixer ops" in cm.explain()


def test_mixed_batch_matches_hf():
    """Prefill + decode + a prompt over two steps in one batch of three sequences."""
    model, cm = _compiled()
    assert_mixed_batch_matches_hf(_WithSlots(cm), model, _prompts(1, (9, 11, 6)), "jamba")


def test_prompt_prefilled_over_several_steps_then_decoded():
    """13 tokens in chunks of 5, 4, 4 (page boundaries inside chunks), then 3 one-token decodes."""
    model, cm = _compiled()
    (ids,) = _prompts(2, (16,))
    packer, pages, got = _WithSlots(cm), [3, 7, 1, 9], []
    for start, end in ((0, 5), (5, 9), (9, 13), (13, 14), (14, 15), (15, 16)):
        got.append(cm.forward(packer.pack([SequenceChunk(ids[start:end], start, pages)], all_logits=True)))
    assert rel_rms(torch.cat(got), _hf_logits(model, ids)) < 1e-4


def test_sequences_in_one_step_do_not_contaminate_each_other():
    """Two sequences prefill together, then continue together: each continues from its own state only."""
    model, cm = _compiled()
    assert_no_cross_talk(cm, model, *_prompts(3, (12, 10)))


class _Recorder(LogitsProcessor):
    """Keeps every next-token logits row the sampler sees, with the tokens it follows (tokens alone would hide a
    state error: the tiny model's greedy margins are wide)."""

    def __init__(self):
        self.rows = []

    def __call__(self, token_ids, logits):
        self.rows.append((list(token_ids), logits.detach().clone()))
        return logits


def _assert_engine_matches_hf(model, engine, arrivals, n):
    """Drive ``arrivals`` of ``(step, prompt)``: every logits row the sampler saw (recomputed ones too) is HF's
    for the same tokens, and the greedy tokens are HF's."""
    recorders = [_Recorder() for _ in arrivals]
    outs = drive(engine, [(step, p, SamplingConfig(max_new_tokens=n, ignore_eos=True, logits_processors=[r]))
                          for (step, p), r in zip(arrivals, recorders)])
    for (_, p), out, rec in zip(arrivals, outs, recorders):
        assert out.output_ids == hf_greedy(model, p, n)
        ref = _hf_logits(model, p + out.output_ids)
        assert len(rec.rows) >= n
        got = torch.stack([row for _, row in rec.rows])
        want = torch.stack([ref[len(ids) - 1] for ids, _ in rec.rows])
        assert rel_rms(got, want) < 1e-4
    engine.kv.check_all_free()


def test_greedy_with_chunked_prefill_matches_hf():
    """Two requests in flight with a 5-token budget: each prompt is prefilled over several steps, next to the
    other's decodes."""
    model, cm = _compiled()
    prompts = _prompts(5, (11, 8))
    _assert_engine_matches_hf(model, Engine(cm, max_num_tokens=5), [(0, prompts[0]), (1, prompts[1])], 8)


def test_preemption_recomputes_the_same_tokens():
    """Four requests growing to 32-38 tokens outgrow the 32 pages: the scheduler preempts, the preempted requests
    take a slot again (holding another sequence's state) and restart from a zero state."""
    model, cm = _compiled()
    engine = Engine(cm)
    _assert_engine_matches_hf(model, engine, [(0, p) for p in _prompts(4, (24, 20, 22, 26))], 12)
    assert engine.stats.num_preemptions > 0


# -- refused forms -------------------------------------------------------------------------------------------------
def test_unverified_activation_is_refused_naming_the_layer():
    """A GELU mixer (not the verified SiLU form) keeps HF's forward, which does not export with dynamic shapes:
    the model is refused, naming the layer and why it was not rewritten."""
    model = make_model("jamba", "eager", hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match=r"activation 'gelu'.*layers\.0\.mamba"):
        autodeploy.compile(model, **KW)


def test_check_names_what_it_does_not_verify():
    from autodeploy.models.stateful.jamba import check

    model = make_model("jamba", "eager")
    mixer = model.model.layers[0].mamba
    assert check(mixer) is None
    mixer.dt_layernorm = torch.nn.Identity()
    assert "dt_layernorm" in check(mixer)
    mixer = make_model("jamba", "eager", mamba_d_conv=3).model.layers[0].mamba
    assert check(mixer) is None  # another kernel width is the same form
    mixer.conv1d.padding = (0,)
    assert "causal depthwise conv" in check(mixer)


@pytest.mark.gpu
def test_jamba_on_gpu():
    """On CUDA (fp32): the chosen attention backend with the torch-reference mixer ops (CUDA-graph lowering
    falling back to eager, with the reason): a mixed batch and greedy decoding match HF eager on the CPU."""
    import copy

    ref = _jamba()
    cm = autodeploy.compile(copy.deepcopy(ref).to("cuda"), **KW)
    assert cm.report.lowering == "eager" and "stateful mixer ops" in cm.report.lowering_reason
    assert_stateful_matches_hf_on_gpu(cm, Engine(cm, max_num_tokens=5), ref, _prompts(1, (9, 11, 6)),
                                      _prompts(2, (11, 8, 13)))
