"""MiniMax lightning attention (models/stateful/minimax.py) as the SSD scan with a state slot per sequence: the
layer rewrite against HF's blocked prefill and step decode, then the hybrid model end to end against HF eager
(mixed batches, chunked prefill, decode, greedy, no cross-talk, preemption), and unverified forms refused."""

import logging

import pytest
import torch

import autodeploy
from autodeploy.metadata import SequenceChunk
from autodeploy.models.stateful import minimax as minimax_rewrite
from autodeploy.passes.check_sequence_mixers import SequenceMixerError
from autodeploy.runtime.engine import Engine
from helpers import (assert_greedy_matches_hf, assert_mixed_batch_matches_hf, assert_no_cross_talk,
                     assert_stateful_matches_hf_on_gpu, drive, hf_greedy, hf_prompt_logits, rel_rms)
from model_zoo import STATEFUL_FAMILIES, make_model
from test_recurrent_state import KW, _greedy, _prompts, _WithSlots

_COMPILED = {}


def _compiled(layer_types=("linear_attention", "full_attention")):
    """One compile per layer layout for the module (compiles dominate this file's time)."""
    if layer_types not in _COMPILED:
        model = make_model("minimax", "eager", tie_word_embeddings=False, layer_types=list(layer_types))
        _COMPILED[layer_types] = model, autodeploy.compile(model, **KW)
    return _COMPILED[layer_types]


def _lightning(model):
    return model.model.layers[model.config.layer_types.index("linear_attention")].self_attn


def test_rewrite_matches_hf_blocked_prefill_and_step_decode(monkeypatch):
    """One layer: the rewrite (SSD scan in blocks of 5) against HF's prefill in blocks of 8 over 21 tokens, and
    HF's token-by-token decode continuing from its cached state."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    monkeypatch.setattr("autodeploy.ops.mixers.ssm.CHUNK", 5)  # our blocks end elsewhere than HF's
    model = make_model("minimax", "eager")
    layer = _lightning(model)
    assert minimax_rewrite.check(layer) is None
    h = torch.randn(2, 24, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = minimax_rewrite.forward(layer, h, None, None)[0]
        cache = MiniMaxCache()
        prefill = layer(h[:, :21], None, None, past_key_values=cache)[0]
        decode = [layer(h[:, t:t + 1], None, None, past_key_values=cache)[0] for t in range(21, 24)]
    assert rel_rms(ours[:, :21], prefill) < 1e-5
    assert rel_rms(ours[:, 21:], torch.cat(decode, dim=1)) < 1e-5


def test_minimax_is_a_stateful_family_with_one_state_per_lightning_layer():
    model, cm = _compiled()
    assert "minimax" in STATEFUL_FAMILIES
    assert not cm.enable_prefix_caching
    heads, d = model.config.num_attention_heads, model.config.head_dim
    assert [(s.kind, tuple(s.shape), s.dtype) for s in cm.state_specs] == [("ssm_scan", (heads, d, d),
                                                                             torch.float32)]
    assert "MiniMaxLightningAttention -> canonical mixer ops: 1 module(s)" in cm.explain()
    assert "moe_experts" in cm.explain()  # the MoE blocks compile through match_moe


@pytest.mark.parametrize("layer_types", [("linear_attention", "full_attention"),
                                         ("full_attention", "linear_attention")])
def test_mixed_batch_and_greedy_match_hf(layer_types):
    """Prefill + decode + a prompt over two steps in one batch, then greedy through the engine with chunked
    prefill (5-token budget) and two requests in flight. The second layout puts the lightning layer last, where
    HF's slope is about 1e-5 (almost no decay)."""
    model, cm = _compiled(layer_types)
    assert_mixed_batch_matches_hf(_WithSlots(cm), model, _prompts(1), f"minimax {layer_types}")
    engine = Engine(cm, max_num_tokens=5)
    prompts = _prompts(2, (11, 8))
    outs = drive(engine, [(0, prompts[0], _greedy()), (1, prompts[1], _greedy())])
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(model, p, 6)
    engine.kv.check_all_free()


def test_prefill_in_several_chunks_matches_hf():
    """A 23-token prompt over four steps (7 + 1 + 9 + 6 tokens), each continuing the state from its slot."""
    model, cm = _compiled()
    prompt = _prompts(8, (23,))[0]
    packer, got, start = _WithSlots(cm), [], 0
    for n in (7, 1, 9, 6):
        got.append(cm.forward(packer.pack([SequenceChunk(prompt[start:start + n], start, [1, 2, 3, 4, 5, 6])],
                                          all_logits=True)))
        start += n
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0]
    assert rel_rms(torch.cat(got), ref) < 1e-4


def test_sequences_in_one_step_do_not_contaminate_each_other():
    """Two sequences prefill together, then continue together; a third reuses a slot with stale state."""
    model, cm = _compiled()
    packer = assert_no_cross_talk(cm, model, *_prompts(3, (12, 10)))
    packer.slots[7] = packer.slots[1]  # pages [7, ...] take sequence a's slot, still holding a's state
    c = _prompts(9, (9,))[0]
    third = cm.forward(packer.pack([SequenceChunk(c, 0, [7, 8, 9])], all_logits=True))
    assert rel_rms(third, hf_prompt_logits(model, c)) < 1e-4


def test_preemption_recomputes_the_same_tokens():
    """32 pages of 4 tokens for 4 requests growing to 32-38 tokens: the scheduler preempts, and a preempted request
    restarts from position 0 with a zero state."""
    model, cm = _compiled()
    assert_greedy_matches_hf(Engine(cm), model, _prompts(4, (24, 20, 22, 26)), 12, preempts=True)


def test_bf16_mixed_batch_within_the_bf16_tier():
    """bf16 weights (decay tables rounded to bf16, which the check accepts within bf16 precision), fp32 state."""
    model = make_model("minimax", "eager", tie_word_embeddings=False, dtype=torch.bfloat16)
    cm = autodeploy.compile(model, **KW)
    assert cm.state_specs[0].dtype == torch.float32
    assert_mixed_batch_matches_hf(_WithSlots(cm), model, _prompts(1), "minimax bf16", tol=2e-2)


def _tamper_key_decay(layer):
    layer.key_decay.mul_(0.5)


def _tamper_slope_shape(layer):
    layer.slope_rate = torch.nn.Buffer(layer.slope_rate.reshape(-1))


def _tamper_negative_slope(layer):
    layer.slope_rate.neg_()


@pytest.mark.parametrize("tamper, reason", [(_tamper_key_decay, "key_decay is not the table"),
                                            (_tamper_slope_shape, "slope_rate is not"),
                                            (_tamper_negative_slope, "not finite and non-negative")])
def test_check_names_the_unverified_form(tamper, reason):
    layer = _lightning(make_model("minimax", "eager"))
    with torch.no_grad():
        tamper(layer)
    assert reason in (minimax_rewrite.check(layer) or "")


def test_unverified_form_keeps_hf_forward_and_is_refused(caplog):
    """Decay tables that do not follow slope_rate (HF's blocked prefill and step decode would then disagree): the
    layer keeps HF's forward, the compile says which layer and why, and the model is refused."""
    model = make_model("minimax", "eager")
    with torch.no_grad():
        _tamper_key_decay(model.model.layers[0].self_attn)
    with caplog.at_level(logging.WARNING, logger="autodeploy.models.stateful"):
        with pytest.raises(SequenceMixerError):
            autodeploy.compile(model, **KW)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "model.layers.0.self_attn (MiniMaxLightningAttention) not rewritten: key_decay" in warned


@pytest.mark.gpu
def test_minimax_on_gpu():
    """On CUDA (fp32): the chosen attention backend with the torch-reference scan; mixed batch and greedy match HF
    (eager, on the CPU, same weights)."""
    import copy

    ref = make_model("minimax", "eager", tie_word_embeddings=False)
    cm = autodeploy.compile(copy.deepcopy(ref).to("cuda"), **KW)
    assert_stateful_matches_hf_on_gpu(cm, Engine(cm, max_num_tokens=5), ref, _prompts(1), _prompts(2, (11, 8, 13)))
