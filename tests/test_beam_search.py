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
        # Tokens the model ranks highest after the prompt: used as EOS ids so that
        # hypotheses really finish early (rank 0 is also the greedy first token).
        first_ranked = model(prompt).logits[0, -1].topk(8).indices.tolist()
    return model, prompt, first_ranked


def _drive(model, prompt, state: BeamSearchState) -> int:
    """Engine stand-in; returns the number of steps (= model forwards) it took."""
    seqs = [prompt[0].tolist()]
    steps = 0
    while not state.is_done:
        assert state.num_live_beams == len(seqs)
        with torch.no_grad():
            logits = model(torch.tensor(seqs)).logits[:, -1, :].float()
        pairs = state.step(torch.log_softmax(logits, dim=-1))
        steps += 1
        assert all(0 <= p < len(seqs) for p, _ in pairs)
        seqs = [seqs[p] + [t] for p, t in pairs]
        if not state.is_done:
            assert len(pairs) == state.num_beams
            assert [s[PROMPT_LEN:] for s in seqs] == state.live_beams
    return steps


def _hf(model, prompt, k, n, r, eos, length_penalty, early_stopping):
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
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
    finally:
        hook.remove()
    # beam_indices is -1 past each hypothesis' end: it gives the exact generated lengths.
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    seqs = [row[PROMPT_LEN : PROMPT_LEN + n_].tolist() for row, n_ in zip(out.sequences, lengths)]
    return seqs, out.sequences_scores.tolist(), len(forwards)


# (num_beams, max_new_tokens, num_return_sequences, EOS as ranks into first_ranked or None,
#  length_penalty, early_stopping). Comments say which HF rule each case pins down.
CASES = [
    (2, 5, 1, None, 1.0, False),  # plain: max length ends every beam
    (3, 8, 2, None, 1.0, False),
    (2, 6, 1, (0,), 1.0, False),  # best hypothesis is the 1-token EOS one
    (3, 8, 3, (0,), 1.0, False),  # running beams after EOS candidates are pushed down
    (2, 8, 2, (0,), 2.0, False),  # length penalty in finished scores
    (2, 8, 2, (0,), 1.0, "never"),  # "never" heuristic uses max_length
    (4, 10, 3, (0,), 0.5, True),
    (4, 8, 4, (0, 1), 0.0, True),  # early_stopping=True ends once k hypotheses finished
    (3, 8, 3, (0, 1), -1.0, False),  # heuristic ends the search before max length
    (3, 8, 3, (1, 2, 3), 0.0, False),  # several EOS ids: top-(1+n_eos)*k candidates
]


@pytest.mark.parametrize("k,n,r,eos_ranks,length_penalty,early_stopping", CASES)
def test_matches_hf_generate(model_and_prompt, k, n, r, eos_ranks, length_penalty, early_stopping):
    model, prompt, first_ranked = model_and_prompt
    eos = None if eos_ranks is None else [first_ranked[i] for i in eos_ranks]
    state = BeamSearchState(k, n, eos or [], length_penalty, early_stopping)
    steps = _drive(model, prompt, state)
    mine = state.finalize_with_scores(r)
    hf_seqs, hf_scores, hf_steps = _hf(model, prompt, k, n, r, eos, length_penalty, early_stopping)

    assert [t for t, _ in mine] == hf_seqs
    assert [s for _, s in mine] == pytest.approx(hf_scores, abs=1e-5)
    assert state.finalize(r) == hf_seqs
    assert steps == hf_steps  # same stopping decision, not just the same winners
    if eos is not None and 0 in eos_ranks and length_penalty <= 1.0:
        # The case must really exercise early finishing, otherwise it proves nothing
        # (with length_penalty > 1 long hypotheses legitimately win).
        assert any(len(t) < n and t[-1] in eos for t in hf_seqs)


def test_multiple_eos_keep_enough_live_candidates():
    """With n EOS ids HF ranks (1 + n) * k candidates, so k live beams survive even when
    the best candidates are all EOS."""
    state = BeamSearchState(2, 10, eos_token_ids=[0, 1, 2])
    # Ranked: 3, then EOS 0, 1, 2, then 4: the top 2k = 4 candidates hold only one live token.
    lp = torch.log_softmax(torch.tensor([[8.0, 7.0, 6.0, 9.0, 5.0, 4.0, 0.0, 0.0]]), dim=-1)
    assert state.step(lp) == [(0, 3), (0, 4)]
    assert not state.is_done


def test_from_config_and_errors(model_and_prompt):
    model, prompt, first_ranked = model_and_prompt
    cfg = SamplingConfig(beam_width=3, n=2, max_new_tokens=6).validate()
    state = BeamSearchState.from_config(cfg, eos_token_ids=[first_ranked[0]])
    assert state.num_beams == 3 and state.eos_token_ids == [first_ranked[0]]
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
