"""Never silently wrong: a model with any sequence mixer that was not converted to cached attention is refused,
with the layer named (passes/check_sequence_mixers.py, passes/match_attention.py)."""

import pytest
import torch

import autodeploy
from autodeploy.errors import UnsupportedModelError
from autodeploy.passes.check_sequence_mixers import SequenceMixerError
from model_zoo import HYBRIDS, REFUSED_HYBRIDS, make_model

KW = dict(max_batch_size=2, max_seq_len=32, page_size=4, num_pages=16)

# Where each hybrid's first Mamba / conv / linear-attention layer lives. Every hybrid of the zoo has a cached
# stateful form now (tests/test_recurrent_state.py and tests/test_<family>_state.py); the test below takes the
# rewrite away, as for a form the rewrite does not verify, and the model must then be refused, never compiled.
HYBRID_LAYER = {"jamba": "layers.0.mamba", "bamba": "layers.0.mamba", "zamba2": "layers.0.mamba",
                "granitemoehybrid": "layers.0.mamba", "falcon_h1": "layers.0.mamba", "lfm2": "layers.0.conv",
                "lfm2_moe": "layers.0.conv", "qwen3_next": "layers.0.linear_attn", "minimax": "layers.0.self_attn"}


@pytest.mark.parametrize("family", sorted(HYBRIDS))
def test_hybrid_with_an_unverified_mixer_form_is_refused(family, monkeypatch):
    from autodeploy.models import stateful

    for name, rw in list(stateful.MIXER_REWRITES.items()):
        monkeypatch.setitem(stateful.MIXER_REWRITES, name,
                            stateful.MixerRewrite(rw.module_class, lambda m: "a form the test calls unverified",
                                                  rw.forward))
    model = make_model(family, "eager")
    with pytest.raises(UnsupportedModelError) as info:
        autodeploy.compile(model, **KW)
    if family in REFUSED_HYBRIDS:  # no rewrite registered for it at all
        return
    msg = str(info.value)  # refused by the mixer check, or at export (HF's own Jamba forward does not export)
    assert "a form the test calls unverified" in msg and HYBRID_LAYER[family] in msg, msg


def _register(name, fn):
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)


def _one_odd_layer(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Layer 1: exact attention without a softmax node (exp / sum by hand); layer 0: HF's sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if module.layer_idx != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    s = (query @ key.transpose(-1, -2)) * scaling
    n = s.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return (p @ value).transpose(1, 2).contiguous(), p


def test_one_unconverted_attention_layer_is_refused_by_name():
    _register("one_odd_layer", _one_odd_layer)
    model = make_model("llama", "one_odd_layer")
    with pytest.raises(SequenceMixerError, match=r"layers\.1\.self_attn"):
        autodeploy.compile(model, **KW)


def _scores_reused(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Softmax attention whose scores also feed the output (``+ 0.1 * max score``): not plain attention."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    s = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        s = s + attention_mask
    out = torch.softmax(s, dim=-1) @ value
    out = out + 0.1 * s.amax(-1, keepdim=True)
    return out.transpose(1, 2).contiguous(), None


def test_softmax_whose_scores_have_other_users_is_not_matched():
    _register("scores_reused", _scores_reused)
    model = make_model("llama", "scores_reused")
    with pytest.raises(UnsupportedModelError, match="have other users"):
        autodeploy.compile(model, **KW)


def test_plain_model_passes_the_check_and_explain_says_so():
    cm = autodeploy.compile(make_model("llama"), **KW)
    rec = [p for p in cm.ctx.report.passes if p.name == "check_sequence_mixers"]
    assert rec and "only the cached attention mixes tokens" in rec[0].notes[0]


def test_check_catches_a_token_mixer_the_matcher_never_sees(monkeypatch):
    """A cumulative mean over the sequence inside an otherwise standard layer (no softmax, no matmul)."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaMLP.forward

    def mixing_mlp(self, x):
        return original(self, x) + x.cumsum(1) / 8

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", mixing_mlp)
    with pytest.raises(SequenceMixerError, match=r"layers\.0\.mlp"):
        autodeploy.compile(make_model("llama"), **KW)


def test_check_probes_with_ids_valid_for_every_embedding_table():
    """A vocabulary smaller than the tabulated RoPE's rows (an embedding lookup by position): the probe's token
    ids must fit both tables, or the check cannot run and the model would be refused for no reason."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=96)
    cm = autodeploy.compile(LlamaForCausalLM(cfg).eval(), max_batch_size=2, max_seq_len=256, warmup=False)
    assert any(p.name == "check_sequence_mixers" for p in cm.report.passes)
