"""Every supported family, both attention implementations: compiled logits match HF eager on a mixed batch
(chunked prefill + decode + prefill in one step, contexts crossing page boundaries), and greedy generation
matches HF ``generate`` token for token."""

import pytest
import torch

import autodeploy
from autodeploy.metadata import SequenceChunk
from autodeploy.runtime.sampling import SamplingConfig
from helpers import hf_greedy, rel_rms
from model_zoo import FAMILIES, make_model

CASES = [(f, impl) for f in FAMILIES for impl in ("sdpa", "eager") if not (f == "gemma2" and impl == "sdpa")]


def _mixed_batch_logits(cm, seqs):
    """Step 1: seq0 prefill (8 tokens), seq1 first chunk (5). Step 2: seq0 decodes, seq1 rest, seq2 prefill."""
    pages = {0: [10, 3, 4], 1: [5, 6, 7, 20], 2: [30, 31]}
    b1 = cm.pack([SequenceChunk(seqs[0][:8], 0, pages[0]), SequenceChunk(seqs[1][:5], 0, pages[1])],
                 all_logits=True)
    l1 = cm.forward(b1)
    b2 = cm.pack([SequenceChunk(seqs[0][8:9], 8, pages[0]), SequenceChunk(seqs[1][5:], 5, pages[1]),
                  SequenceChunk(seqs[2], 0, pages[2])], all_logits=True)
    l2 = cm.forward(b2)
    got = {0: [l1[:8], l2[b2.logits_rows.index(0):][:1]], 1: [l1[8:13]], 2: []}
    rows1 = [i for i, r in enumerate(b2.logits_rows) if r == 1]
    rows2 = [i for i, r in enumerate(b2.logits_rows) if r == 2]
    got[1].append(l2[rows1])
    got[2].append(l2[rows2])
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.parametrize("family,impl", CASES)
def test_logits_match_hf_on_mixed_batch(family, impl):
    model = make_model(family, impl)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    g = torch.Generator().manual_seed(hash(family) % 1000)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    got = _mixed_batch_logits(cm, seqs)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = model(torch.tensor([s])).logits[0]
            assert got[i].shape == ref.shape
            err = rel_rms(got[i], ref)
            assert err < 1e-4, f"{family}/{impl} seq {i}: rel RMS {err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_hf(family):
    impl = "eager" if family == "gemma2" else "sdpa"
    model = make_model(family, impl, seed=3)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 11, 1)]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=32, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model, p, 32), f"{family}: prompt of {len(p)} tokens diverged"
