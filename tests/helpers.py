"""Shared test utilities."""

from __future__ import annotations

import torch

from autodeploy.numerics import rel_rms  # noqa: F401  (re-exported for the tests)


def hf_greedy(model, prompt, n):
    """HF generate with EOS disabled (our side uses ignore_eos), new tokens only."""
    gen = model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = None
    try:
        ids = torch.tensor([prompt])
        # an explicit mask: without one HF infers it from pad_token_id and masks every prompt token equal to it
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    finally:
        gen.eos_token_id = saved
    return out[0, len(prompt):].tolist()


def prompt_logits(cm, prompt):
    """Our logits for every token of ``prompt``, prefilled alone in one step."""
    import math

    from autodeploy.metadata import SequenceChunk

    pages = list(range(math.ceil(len(prompt) / cm.page_size)))
    return cm.forward(cm.pack([SequenceChunk(prompt, 0, pages)], all_logits=True))


def hf_prompt_logits(model, prompt):
    """HF eager's logits for every token of ``prompt``."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def drive(engine, arrivals, max_steps: int = 5000):
    """Run an engine over ``arrivals`` = [(step, prompt, sampling)] (requests join at their step); returns the
    outputs in arrival order. Fails instead of hanging if the engine stops making progress."""
    reqs, step = [None] * len(arrivals), 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or engine.has_work():
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            reqs[i] = engine.add_request(arrivals[i][1], arrivals[i][2])
        engine.step()
        step += 1
        assert step < max_steps, "engine does not make progress"
    return [engine.output(r) for r in reqs]


def mixed_batch_logits(cm, seqs):
    """Per sequence, the logits of a mixed batch in two steps (contexts crossing page boundaries of size 4).
    Step 1: seq0 prefill (8 tokens), seq1 first chunk (5). Step 2: seq0 decodes, seq1 rest, seq2 prefill."""
    from autodeploy.metadata import SequenceChunk

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


def assert_mixed_batch_matches_hf(cm, model, seqs, label: str, tol: float = 1e-4) -> None:
    """:func:`mixed_batch_logits` of ``seqs`` against HF's forward of each sequence alone."""
    got = mixed_batch_logits(cm, seqs)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = model(torch.tensor([s])).logits[0]
            assert got[i].shape == ref.shape
            err = rel_rms(got[i], ref)
            assert err < tol, f"{label} seq {i}: rel RMS {err:.2e}"


class WithSlots:
    """``cm.pack`` with a state slot per sequence, for stateful models driven without an engine (sequences are
    told apart by their first page, as the mixed-batch helpers give each its own page list)."""

    def __init__(self, cm):
        self.cm, self.slots = cm, {}

    def pack(self, chunks, all_logits=False):
        from autodeploy.metadata import SequenceChunk

        chunks = [SequenceChunk(c.token_ids, c.num_cached, c.pages, c.want_logits,
                                state_slot=self.slots.setdefault(c.pages[0], len(self.slots))) for c in chunks]
        return self.cm.pack(chunks, all_logits=all_logits)

    def forward(self, batch):
        return self.cm.forward(batch)


def assert_no_cross_talk(cm, model, a, b) -> WithSlots:
    """Two sequences of a stateful model prefill together, then continue together: each must continue from its
    own state only (logits against HF on each sequence alone). Returns the packer, with both slots taken."""
    from autodeploy.metadata import SequenceChunk

    packer = WithSlots(cm)
    cm.forward(packer.pack([SequenceChunk(a[:6], 0, [1, 2, 3]), SequenceChunk(b[:5], 0, [4, 5, 6])]))
    second = cm.forward(packer.pack([SequenceChunk(a[6:], 6, [1, 2, 3]), SequenceChunk(b[5:], 5, [4, 5, 6])],
                                    all_logits=True))
    ref = torch.cat([hf_prompt_logits(model, a)[6:], hf_prompt_logits(model, b)[5:]])
    assert rel_rms(second, ref) < 1e-4
    return packer


def assert_greedy_matches_hf(engine, model, prompts, new_tokens: int, preempts: bool = False) -> None:
    """Every prompt's greedy tokens through ``engine`` equal HF generate's. ``preempts``: the prompts arrive at
    once and the run must preempt (the recomputed requests still agree); else one arrives per step. No page is
    left allocated."""
    from autodeploy import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    outs = drive(engine, [(0 if preempts else i, p, cfg) for i, p in enumerate(prompts)])
    if preempts:
        assert engine.stats.num_preemptions > 0
    for p, out in zip(prompts, outs):
        assert out.output_ids == hf_greedy(model, p, new_tokens)
    engine.kv.check_all_free()


def assert_stateful_matches_hf_on_gpu(cm, engine, ref, seqs, prompts, new_tokens: int = 10) -> None:
    """A stateful model compiled on CUDA against HF eager on the CPU (same weights): the mixed batch of ``seqs``
    (logits) and greedy decoding of ``prompts`` through ``engine``."""
    got = mixed_batch_logits(WithSlots(cm), seqs)
    for i, seq in enumerate(seqs):
        assert rel_rms(got[i].cpu(), hf_prompt_logits(ref, seq)) < 1e-4, i
    assert_greedy_matches_hf(engine, ref, prompts, new_tokens)


def gpu_llama(dtype, seed=0, layers=2):
    """A 1024-wide random Llama on CUDA (32k vocabulary), its LM head scaled for clear greedy margins."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # clear greedy margins on random weights
    return m.to(dtype).eval()
