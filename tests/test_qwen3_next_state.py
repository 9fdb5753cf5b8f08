"""Qwen3-Next Gated DeltaNet (autodeploy/ops/mixers/gated_delta.py, models/stateful/qwen3_next.py): the gated
delta rule against HF's token-by-token recurrence, its cached op across chunks, the layer rewrite against HF's
layer, then the hybrid model end to end against HF eager (mixed batches, chunked prefill, decode, greedy, no
cross-talk, preemption), and unverified forms refused by name."""

import pytest
import torch

import autodeploy
from autodeploy.metadata import SequenceChunk
from autodeploy.models.stateful import qwen3_next as qwen3_next_rewrite
from autodeploy.ops.mixers import MIXER_KINDS
from autodeploy.ops.mixers.gated_delta import cached_gated_delta_rule_reference, gated_delta_rule_reference
from autodeploy.passes.check_sequence_mixers import SequenceMixerError
from autodeploy.runtime.engine import Engine
from helpers import (assert_mixed_batch_matches_hf, assert_no_cross_talk, assert_stateful_matches_hf_on_gpu,
                     drive, hf_greedy, rel_rms)
from model_zoo import STATEFUL_FAMILIES, make_model
from test_recurrent_state import KW, _greedy, _prompts, _run_cached, _split_steps, _WithSlots

_COMPILED = {}


def _compiled():
    """One compile for the module (compiles dominate this file's time). The linear-attention output is scaled up
    so that greedy tokens depend on its state (at HF's init scale a lost state still decodes the same tokens)."""
    if not _COMPILED:
        model = make_model("qwen3_next", "eager", tie_word_embeddings=False)
        with torch.no_grad():
            model.model.layers[0].linear_attn.out_proj.weight.mul_(10.0)
        _COMPILED["m"] = model, autodeploy.compile(model, **KW)
    return _COMPILED["m"]


def _inputs(L=10, Hk=2, Hv=4, Dk=5, Dv=3, seed=0):
    from transformers.models.qwen3_next.modeling_qwen3_next import l2norm

    g = torch.Generator().manual_seed(seed)
    q, k = l2norm(torch.randn(1, L, Hk, Dk, generator=g)), l2norm(torch.randn(1, L, Hk, Dk, generator=g))
    v = torch.randn(1, L, Hv, Dv, generator=g)
    return q, k, v, -torch.rand(1, L, Hv, generator=g) * 2, torch.rand(1, L, Hv, generator=g)


@pytest.mark.parametrize("chunk", [64, 3])
def test_gated_delta_rule_reference_and_cached_op_across_chunks(chunk, monkeypatch):
    """``chunk``: the reference's block size (3: blocks end inside prefill chunks, the state handed between
    blocks). Against HF's token-by-token recurrence (an independent form), from zero and from a given state."""
    monkeypatch.setattr("autodeploy.ops.mixers.gated_delta.CHUNK", chunk)
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule as hf_rule

    q, k, v, g, beta = _inputs()
    scale = q.shape[-1] ** -0.5
    hf, hf_state = hf_rule(q, k, v, g, beta, output_final_state=True)
    torch.testing.assert_close(gated_delta_rule_reference(q, k, v, g, beta, scale), hf, rtol=1e-5, atol=1e-5)
    # cached: sequence 0 in chunks 3 / 5 then decodes, sequence 1 (its first 7 tokens) in 4 / decodes (batched
    # with sequence 0's), sequence 2 a one-token prompt (a single token at position 0); stale slots
    state = torch.randn(4, 4, 5, 3, generator=torch.Generator().manual_seed(1))
    per_token = [[t[0], t[0, :7], t[0, 5:6]] for t in (q, k, v, g, beta)]
    got = _run_cached(cached_gated_delta_rule_reference, per_token, state,
                      _split_steps([10, 7, 1], [[3, 8, 9], [4, 5, 6], []]), {0: 1, 1: 2, 2: 0}, scale=scale)
    torch.testing.assert_close(got[0], hf[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[1], hf_state[0], rtol=1e-5, atol=1e-5)  # the final state stays in its slot
    for seq, part in ((1, slice(0, 7)), (2, slice(5, 6))):
        torch.testing.assert_close(got[seq], hf_rule(*(t[:, part] for t in (q, k, v, g, beta)))[0][0], rtol=1e-5,
                                   atol=1e-5)


def test_standin_is_the_one_token_rule():
    """The mixer check's token-local stand-in: what the rule gives a token from a zero state."""
    q, k, v, g, beta = _inputs(L=6)
    standin = MIXER_KINDS["gated_delta_rule"].standin(q, k, v, g, beta, scale=0.5)
    one_by_one = torch.cat([gated_delta_rule_reference(*(x[:, t:t + 1] for x in (q, k, v, g, beta)), 0.5)
                            for t in range(6)], dim=1)
    torch.testing.assert_close(standin, one_by_one)


def test_rewrite_matches_the_hf_layer(monkeypatch):
    """One layer over 70 tokens (blocks of 64: the state crosses a block inside the prompt) against HF's layer."""
    model = make_model("qwen3_next", "eager")
    layer = model.model.layers[0].linear_attn
    assert qwen3_next_rewrite.check(layer) is None
    h = torch.randn(2, 70, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_rms(qwen3_next_rewrite.forward(layer, h), layer(h)) < 1e-5


def test_qwen3_next_is_a_stateful_family_with_conv_and_delta_states():
    model, cm = _compiled()
    assert "qwen3_next" in STATEFUL_FAMILIES and not cm.enable_prefix_caching
    c = model.config
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    assert [(s.kind, tuple(s.shape), s.dtype) for s in cm.state_specs] == [
        ("causal_conv1d", (c.linear_conv_kernel_dim - 1, conv_dim), torch.float32),
        ("gated_delta_rule", (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim),
         torch.float32)]
    assert "Qwen3NextGatedDeltaNet -> canonical mixer ops: 1 module(s)" in cm.explain()


def test_mixed_batch_and_multi_chunk_prefill_match_hf():
    """Mixed steps (prefill + decode, a prompt over two steps), then one prompt over three steps of 7, 6 and 1
    tokens (the last a decode): every logit against HF's forward of the whole prompt."""
    model, cm = _compiled()
    assert_mixed_batch_matches_hf(_WithSlots(cm), model, _prompts(1), "qwen3_next")
    prompt = _prompts(11, (14,))[0]
    packer, pages, got = _WithSlots(cm), [2, 9, 4, 11], []
    for start, end in ((0, 7), (7, 13), (13, 14)):
        got.append(cm.forward(packer.pack([SequenceChunk(prompt[start:end], start, pages)], all_logits=True)))
    with torch.no_grad():
        assert rel_rms(torch.cat(got), model(torch.tensor([prompt])).logits[0]) < 1e-4


def test_sequences_in_one_step_do_not_contaminate_each_other():
    """Two sequences prefill together, then continue together: each continues from its own states only."""
    model, cm = _compiled()
    assert_no_cross_talk(cm, model, *_prompts(3, (12, 10)))


def test_greedy_with_chunked_prefill_and_preemption_matches_hf():
    """Chunked prefill (5-token budget) with two requests in flight; then 4 requests growing to 32-38 tokens in 32
    pages of 4: the scheduler preempts, and the preempted requests restart from zero states. Greedy = HF."""
    model, cm = _compiled()
    engine = Engine(cm, max_num_tokens=5)
    prompts = _prompts(2, (11, 8))
    for p, out in zip(prompts, drive(engine, [(0, prompts[0], _greedy()), (1, prompts[1], _greedy())])):
        assert out.output_ids == hf_greedy(model, p, 6)
    engine.kv.check_all_free()
    engine = Engine(cm)
    prompts = _prompts(4, (24, 20, 22, 26))
    outs = drive(engine, [(0, p, _greedy(12)) for p in prompts])
    assert engine.stats.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(model, p, 12)
    engine.kv.check_all_free()


class FusedRMSNormGated(torch.nn.Module):
    """Another library's gated norm (same parameters): not the verified HF norm, so not assumed equal."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x, gate):
        return x * gate


def test_unverified_forms_are_refused_by_layer_name():
    """A non-silu activation or a foreign gated norm keeps HF's forward: the mixer check refuses the model, naming
    the layer (one compile: exporting HF's own forward is this file's slowest step)."""
    gelu = make_model("qwen3_next", "eager", hidden_act="gelu")
    assert "activation 'gelu'" in qwen3_next_rewrite.check(gelu.model.layers[0].linear_attn)
    model = make_model("qwen3_next", "eager")
    layer = model.model.layers[0].linear_attn
    layer.norm = FusedRMSNormGated(layer.norm)
    assert "norm is FusedRMSNormGated" in qwen3_next_rewrite.check(layer)
    with pytest.raises(SequenceMixerError, match=r"layers\.0\.linear_attn"):
        autodeploy.compile(model, **KW)


@pytest.mark.gpu
def test_qwen3_next_on_gpu():
    """On CUDA (fp32): the chosen attention backend with the torch-reference mixer ops, mixed batches and greedy
    through the engine (asynchronous scheduling, chunked prefill) against HF eager on the CPU, same weights."""
    import copy

    ref = make_model("qwen3_next", "eager", tie_word_embeddings=False)
    cm = autodeploy.compile(copy.deepcopy(ref).to("cuda"), **KW)
    assert_stateful_matches_hf_on_gpu(cm, Engine(cm, max_num_tokens=5), ref, _prompts(1), _prompts(2, (11, 8, 13)))
