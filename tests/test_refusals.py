"""Never silently wrong: a model with any sequence mixer that was not converted to cached attention is refused,
with the layer named (passes/check_sequence_mixers.py, passes/match_attention.py)."""

import pytest
import torch

import autodeploy
from autodeploy.errors import UnsupportedModelError
from autodeploy.passes.check_sequence_mixers import SequenceMixerError
from model_zoo import REFUSED_HYBRIDS, make_model

KW = dict(max_batch_size=2, max_seq_len=32, page_size=4, num_pages=16)

# Where each refused hybrid's unconverted mixer lives (its first Mamba / linear-attention layer); None: the model
# is refused before the check (export fails) or the probe cannot run it, which is refused as well. The hybrids with
# a cached stateful form (LFM2, Bamba, GraniteMoeHybrid, Zamba2, Falcon-H1) run: tests/test_recurrent_state.py.
HYBRID_LAYER = {"jamba": None, "qwen3_next": "layers.0.linear_attn", "minimax": None}


@pytest.mark.parametrize("family", REFUSED_HYBRIDS)
def test_hybrid_models_are_refused(family):
    model = make_model(family, "eager")
    with pytest.raises(UnsupportedModelError) as info:
        autodeploy.compile(model, **KW)
    layer = HYBRID_LAYER[family]
    if layer is not None:
        assert isinstance(info.value, SequenceMixerError)
        assert layer in str(info.value), str(info.value)


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
