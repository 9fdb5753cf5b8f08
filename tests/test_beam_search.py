"""BeamSearchState must reproduce HF ``generate(num_beams=k, do_sample=False)`` exactly.

The driver below plays the engine: it recomputes full (uncached) logits for every live
beam, feeds their log_softmax to ``step`` and rebuilds sequences from (parent, token).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autodeploy.runtime.beam_search import BeamSearchState
from autodeploy.runtime.sampling import SamplingConfig

PROMPT_LEN = 6
PAD = 0


@pytest.fixture(scope="module")
def model_and_prompt():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval().to(torch.float32)
    prompt = torch.randint(3, 128, (1, PROMPT_LEN))
    with torch.no_grad():
        greedy = model.generate(prompt, do_sample=False, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
    return model, prompt, greedy[0, PROMPT_LEN:].tolist()


def _drive(model, prompt, state: BeamSearchState) -> None:
    seqs = [prompt[0].tolist()]
    while not state.is_done:
        assert state.num_live_beams == len(seqs)
        with torch.no_grad():
            logits = model(torch.tensor(seqs)).logits[:, -1, :].float()
        pairs = state.step(torch.log_softmax(logits, dim=-1))
        assert all(0 <= p < len(seqs) for p, _ in pairs)
        seqs = [seqs[p] + [t] for p, t in pairs]
        if not state.is_done:
            assert [s[PROMPT_LEN:] for s in seqs] == state.live_beams


def _hf(model, prompt, k, n, r, eos, length_penalty, early_stopping):
    with torch.no_grad():
        out = model.generate(
            prompt,
            num_beams=k,
            do_sample=False,
            max_new_tokens=n,
            num_return_sequences=r,
            eos_token_id=eos,
            pad_token_id=PAD,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            return_dict_in_generate=True,
            output_scores=True,
        )
    # beam_indices is -1 past each hypothesis' end: it gives the exact generated lengths.
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    seqs = [row[PROMPT_LEN : PROMPT_LEN + n_].tolist() for row, n_ in zip(out.sequences, lengths)]
    return seqs, out.sequences_scores.tolist()


# eos: None, or the index into the greedy continuation whose token becomes the EOS id
# (index 0 = the very first greedy token, so some beams finish after one step).
CASES = [
    (2, 5, 1, None, 1.0, False),
    (3, 8, 2, None, 1.0, False),
    (4, 10, 3, 0, 1.0, False),
    (2, 6, 1, 0, 1.0, False),
    (4, 10, 4, 2, 2.0, False),
    (4, 10, 4, 0, 0.5, True),
    (3, 10, 3, 0, 1.0, "never"),
]


@pytest.mark.parametrize("k,n,r,eos_pos,length_penalty,early_stopping", CASES)
def test_matches_hf_generate(model_and_prompt, k, n, r, eos_pos, length_penalty, early_stopping):
    model, prompt, greedy = model_and_prompt
    eos = None if eos_pos is None else greedy[eos_pos]
    state = BeamSearchState(k, n, [] if eos is None else [eos], length_penalty, early_stopping)
    _drive(model, prompt, state)
    mine = state.finalize_with_scores(r)
    hf_seqs, hf_scores = _hf(model, prompt, k, n, r, eos, length_penalty, early_stopping)

    assert [t for t, _ in mine] == hf_seqs
    assert [s for _, s in mine] == pytest.approx(hf_scores, abs=1e-5)
    assert state.finalize(r) == hf_seqs
    if eos_pos == 0:
        # The case must really exercise early finishing, otherwise it proves nothing.
        assert any(len(t) < n and t[-1] == eos for t in hf_seqs)


def test_from_config_and_errors(model_and_prompt):
    model, prompt, greedy = model_and_prompt
    cfg = SamplingConfig(beam_width=3, n=2, max_new_tokens=6).validate()
    state = BeamSearchState.from_config(cfg, eos_token_ids=[greedy[0]])
    assert state.num_beams == 3 and state.eos_token_ids == [greedy[0]]
    assert BeamSearchState.from_config(SamplingConfig(beam_width=2, ignore_eos=True), [5]).eos_token_ids == []
    with pytest.raises(ValueError):
        state.step(torch.zeros(2, 128))  # first step expects exactly the prompt row
    _drive(model, prompt, state)
    assert len(state.finalize(2)) == 2
    with pytest.raises(RuntimeError):
        state.step(torch.zeros(3, 128))
    with pytest.raises(ValueError):
        state.finalize(4)


def test_finalize_before_done_uses_live_beams():
    state = BeamSearchState(2, 10)
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), dim=-1)
    pairs = state.step(lp)
    assert pairs == [(0, 1), (0, 2)]
    assert state.finalize(2) == [[1], [2]]
