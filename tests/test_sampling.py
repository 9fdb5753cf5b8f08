"""Sampler, SamplingConfig and hooks: masks vs HF warpers, reproducibility, user hooks, validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    GenerationConfig,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from autodeploy.errors import SamplingConfigError
from autodeploy.runtime.hooks import LogitsProcessor, StoppingCriteria, StopOnStrings, StopOnTokens
from autodeploy.runtime.sampling import (
    SamplingConfig,
    Sampler,
    apply_penalties,
    apply_sampling_masks,
    build_stopping_criteria,
    make_generator,
    token_counts,
)

V = 64


def _logits(b: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


def _sample_many(logits, cfgs, draws, seed=0):
    """Tokens [draws, B] from repeated sampling of the same logits with fixed generators."""
    sampler = Sampler()
    b = logits.shape[0]
    gens = [make_generator(seed + i) for i in range(b)]
    out = [sampler.sample(logits, cfgs, [[1, 2, 3]] * b, [3] * b, gens).tokens for _ in range(draws)]
    return torch.stack(out)


# ---------------------------------------------------------------- filters never leak


def test_top_k_never_emits_outside_top_k():
    logits = _logits(4)
    ks = [1, 3, 5, 10]
    cfgs = [SamplingConfig(temperature=1.5, top_k=k) for k in ks]
    toks = _sample_many(logits, cfgs, 400)
    for row, k in enumerate(ks):
        allowed = set(logits[row].topk(k).indices.tolist())
        seen = set(toks[:, row].tolist())
        assert seen <= allowed
        if k > 1:
            assert len(seen) > 1  # really sampling, not argmax
    assert len(set(toks[:, 3].tolist())) >= 6  # with k=10 and T=1.5, most of the set shows up


def _nucleus(row: torch.Tensor, p: float) -> set[int]:
    """Reference: smallest highest-probability set whose mass reaches p."""
    probs = row.softmax(-1).double()
    order = probs.argsort(descending=True).tolist()
    out, mass = set(), 0.0
    for t in order:
        out.add(t)
        mass += probs[t].item()
        if mass >= p:
            break
    return out


def test_top_p_never_emits_outside_nucleus():
    logits = _logits(3, seed=1)
    ps = [0.3, 0.6, 0.9]
    cfgs = [SamplingConfig(temperature=1.0, top_p=p) for p in ps]
    toks = _sample_many(logits, cfgs, 400)
    for row, p in enumerate(ps):
        allowed = _nucleus(logits[row], p)
        seen = set(toks[:, row].tolist())
        assert seen <= allowed
    assert len(set(toks[:, 2].tolist())) > 1


def test_min_p_never_emits_below_threshold():
    logits = _logits(2, seed=2)
    cfgs = [SamplingConfig(temperature=1.0, min_p=0.1), SamplingConfig(temperature=1.0, min_p=0.02)]
    toks = _sample_many(logits, cfgs, 300)
    for row, mp in enumerate([0.1, 0.02]):
        probs = logits[row].softmax(-1)
        allowed = set(torch.nonzero(probs >= mp * probs.max()).flatten().tolist())
        assert set(toks[:, row].tolist()) <= allowed


# ---------------------------------------------------------------- greedy / temperature


def test_temperature_zero_is_greedy_and_tiny_temperature_is_argmax():
    logits = _logits(8, seed=3)
    sampler = Sampler()
    ids, plens = [[1]] * 8, [1] * 8
    greedy = sampler.sample(logits, [SamplingConfig()] * 8, ids, plens)
    assert torch.equal(greedy.tokens, logits.argmax(-1))
    expected_lp = torch.log_softmax(logits, -1).gather(1, greedy.tokens[:, None]).squeeze(1)
    torch.testing.assert_close(greedy.logprobs, expected_lp)

    gens = [make_generator(i) for i in range(8)]
    for _ in range(20):
        tiny = sampler.sample(logits, [SamplingConfig(temperature=1e-6)] * 8, ids, plens, gens)
        assert torch.equal(tiny.tokens, greedy.tokens)
        assert torch.allclose(tiny.logprobs, torch.zeros(8), atol=1e-5)  # distribution is one-hot


def test_mixed_batch_greedy_rows_unaffected_by_sampling_rows():
    logits = _logits(4, seed=4)
    cfgs = [
        SamplingConfig(),
        SamplingConfig(temperature=1.0, top_k=3),
        SamplingConfig(),
        SamplingConfig(temperature=2.0),
    ]
    gens = [None, make_generator(1), None, make_generator(2)]
    out = Sampler().sample(logits, cfgs, [[0]] * 4, [1] * 4, gens)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()
    assert out.tokens[1] in logits[1].topk(3).indices
    # logprob of a sampled row is taken from its processed (tempered, masked) distribution
    masked = apply_sampling_masks(logits[1:2], [1.0], [3], [1.0], [0.0])
    assert out.logprobs[1].item() == pytest.approx(torch.log_softmax(masked, -1)[0, out.tokens[1]].item(), abs=1e-6)
    assert math.isfinite(out.logprobs[3].item())


# ---------------------------------------------------------------- reproducibility


def _seeded_run(batch_logits_fn, row: int, cfgs, seeds, steps=15):
    sampler = Sampler()
    gens = [make_generator(s) for s in seeds]
    b = len(cfgs)
    toks = []
    for step in range(steps):
        logits = batch_logits_fn(step)
        out = sampler.sample(logits, cfgs, [[1, 2]] * b, [2] * b, gens)
        toks.append(out.tokens[row].item())
    return toks


def test_seeded_request_reproducible_regardless_of_batch():
    target_logits = [_logits(1, seed=100 + s, scale=1.0)[0] for s in range(15)]
    target = SamplingConfig(temperature=1.0, top_p=0.95, seed=1234)

    alone = _seeded_run(lambda s: target_logits[s][None], 0, [target], [1234])
    again = _seeded_run(lambda s: target_logits[s][None], 0, [target], [1234])
    assert alone == again

    # Same request at row 2 of a batch with unseeded and differently seeded random rows.
    others = [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.3, top_k=5), SamplingConfig()]
    cfgs = [others[0], others[1], target, others[2]]

    def batch(s):
        noise = _logits(4, seed=500 + s)
        noise[2] = target_logits[s]
        return noise

    torch.manual_seed(999)  # global RNG state differs for the unseeded row
    in_batch = _seeded_run(batch, 2, cfgs, [None, 7, 1234, None])
    assert in_batch == alone

    other_seed = _seeded_run(lambda s: target_logits[s][None], 0, [target], [4321])
    assert other_seed != alone  # the seed really matters


# ---------------------------------------------------------------- parity with HF processors


def test_repetition_penalty_matches_hf():
    logits = _logits(3, seed=5)
    token_ids = [[1, 5, 5, 9, 40, 3], [7, 8, 63, 0], [2, 2, 2]]
    prompt_lens = [3, 2, 1]
    penalties = [1.3, 0.7, 2.0]
    ours = apply_penalties(logits.clone(), token_ids, prompt_lens, penalties, [0.0] * 3, [0.0] * 3)
    for i in range(3):
        hf = RepetitionPenaltyLogitsProcessor(penalties[i])(torch.tensor([token_ids[i]]), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], hf, rtol=0, atol=0)
    assert not torch.equal(ours, logits)


def test_presence_frequency_penalties_apply_to_output_only():
    logits = _logits(2, seed=6)
    token_ids = [[4, 4, 10, 10, 10, 11], [20, 21, 22]]
    prompt_lens = [2, 3]  # row0 prompt = [4, 4]; output = [10, 10, 10, 11]; row1 has no output
    pres, freq = [0.5, 1.0], [0.25, 1.0]
    ours = apply_penalties(logits.clone(), token_ids, prompt_lens, [1.0, 1.0], pres, freq)
    expected = logits.clone()
    for i in range(2):
        out = token_ids[i][prompt_lens[i] :]
        for t in set(out):
            expected[i, t] -= freq[i] * out.count(t) + pres[i]
    torch.testing.assert_close(ours, expected)
    assert ours[0, 4] == logits[0, 4]  # prompt tokens are not penalized
    assert torch.equal(ours[1], logits[1])


def test_token_counts_scatter():
    all_c, out_c = token_counts([[1, 1, 2], [3]], [1, 0], 5, "cpu")
    assert all_c.tolist() == [[0, 2, 1, 0, 0], [0, 0, 0, 1, 0]]
    assert out_c.tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]


def _hf_chain(row: torch.Tensor, t: float, k: int, p: float, mp: float) -> torch.Tensor:
    ids = torch.zeros(1, 1, dtype=torch.long)
    x = row[None].clone()
    if t != 1.0:
        x = TemperatureLogitsWarper(t)(ids, x)
    if k != 0:
        x = TopKLogitsWarper(k)(ids, x)
    if p < 1.0:
        x = TopPLogitsWarper(p)(ids, x)
    if mp > 0:
        x = MinPLogitsWarper(mp)(ids, x)
    return x[0]


MASK_PARAMS = [
    # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 10, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.5, 20, 0.8, 0.0),
    (2.0, 30, 0.95, 0.02),
    (1.0, 1, 1.0, 0.0),
    (1.0, 0, 0.1, 0.0),
    (0.9, 64, 0.5, 0.3),
    (1.0, 0, 1e-9, 0.0),  # even the top token is "inside 1 - p": HF still keeps it
]


def test_sampling_masks_match_hf_warpers():
    b = len(MASK_PARAMS)
    logits = _logits(b, seed=7)
    t, k, p, mp = (list(c) for c in zip(*MASK_PARAMS))
    ours = apply_sampling_masks(logits, t, k, p, mp)  # all rows at once, different params
    removed_counts = []
    for i, params in enumerate(MASK_PARAMS):
        ref = _hf_chain(logits[i], *params)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), params
        keep = torch.isfinite(ref)
        torch.testing.assert_close(ours[i][keep], ref[keep])
        removed_counts.append(int((~keep).sum()))
    assert removed_counts[0] == 0 and removed_counts[6] == V - 1 and removed_counts[-1] == V - 1
    assert all(c > 0 for c in removed_counts[1:])  # every filter row really removes something


def test_top_p_exact_boundaries_match_hf():
    """top_p set so 1 - top_p lands exactly on each cumulative-probability value.

    HF compares fp32 cumsums with the double ``1 - top_p`` (cast to fp32); computing
    ``1 - fp32(top_p)`` instead flips the mask at many of these boundaries.
    """
    x = _logits(1, seed=11, scale=2.0)
    cum = x.sort(dim=-1)[0].softmax(-1).cumsum(-1)[0]
    ps = [1.0 - float(c) for c in cum[:-1] if 0.0 < 1.0 - float(c) < 1.0]
    assert len(ps) > 30
    ids = torch.zeros(1, 1, dtype=torch.long)
    rows = x.expand(len(ps), V)
    ours = apply_sampling_masks(rows, [1.0] * len(ps), [0] * len(ps), ps, [0.0] * len(ps))
    for i, p in enumerate(ps):
        ref = TopPLogitsWarper(p)(ids, x.clone())[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), p


def test_sampler_masks_and_penalties_compose_like_hf():
    """Full sampler with top_k=1 is deterministic: compare its pick with HF's processor chain."""
    logits = _logits(2, seed=8)
    token_ids = [[int(logits[0].argmax()), 3], [int(logits[1].argmax())]]
    cfgs = [SamplingConfig(temperature=0.8, top_k=1, repetition_penalty=5.0), SamplingConfig(repetition_penalty=5.0)]
    out = Sampler().sample(logits, cfgs, token_ids, [1, 1], [make_generator(0), None])
    for i in range(2):
        x = RepetitionPenaltyLogitsProcessor(5.0)(torch.tensor([token_ids[i]]), logits[i : i + 1].clone())
        assert out.tokens[i] == x.argmax()
        assert out.tokens[i] != logits[i].argmax()  # the penalty changed the pick


# ---------------------------------------------------------------- user hooks


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token
        self.calls = 0

    def __call__(self, token_ids, logits):
        self.calls += 1
        logits[self.token] = float("-inf")
        return logits


class BatchedBan(LogitsProcessor):
    batched = True

    def __init__(self, token: int):
        self.token = token
        self.batch_sizes: list[int] = []

    def __call__(self, token_ids, logits):
        self.batch_sizes.append(len(token_ids))
        logits[:, self.token] = float("-inf")
        return logits


def test_user_logits_processor_bans_token():
    logits = _logits(3, seed=9)
    top = logits.argmax(-1)
    bans = [BanToken(int(top[i])) for i in range(3)]
    cfgs = [
        SamplingConfig(logits_processors=[bans[0]]),
        SamplingConfig(temperature=1.0, logits_processors=[bans[1]]),
        SamplingConfig(),
    ]
    original = logits.clone()
    for _ in range(30):
        out = Sampler().sample(logits, cfgs, [[1]] * 3, [1] * 3, [None, make_generator(3), None])
        assert out.tokens[0] == logits[0].topk(2).indices[1]  # second best once the best is banned
        assert out.tokens[1] != top[1]
        assert out.tokens[2] == top[2]  # rows without the processor are untouched
    assert torch.equal(logits, original)  # caller's tensor not modified
    assert bans[0].calls == 30 and bans[2].calls == 0


def test_batched_logits_processor_called_once_for_its_rows():
    logits = _logits(4, seed=10)
    proc = BatchedBan(int(logits[0].argmax()))
    with_proc = SamplingConfig(logits_processors=[proc])
    cfgs = [with_proc, SamplingConfig(), SamplingConfig(logits_processors=[proc]), SamplingConfig()]
    out = Sampler().sample(logits, cfgs, [[1]] * 4, [1] * 4)
    assert proc.batch_sizes == [2]
    assert out.tokens[0] != proc.token and out.tokens[2] != proc.token
    assert torch.equal(out.tokens[[1, 3]], logits[[1, 3]].argmax(-1))


def _generate(step_logits, prompt, cfg, eos=(), detokenize=None):
    """Minimal engine loop: sampler + stop checks."""
    sampler = Sampler()
    criteria = build_stopping_criteria(cfg, eos, len(prompt), detokenize)
    ids = list(prompt)
    gen = make_generator(cfg.seed)
    for _ in range(cfg.max_new_tokens):
        tok = int(sampler.sample(step_logits(ids)[None], [cfg], [ids], [len(prompt)], [gen]).tokens[0])
        ids.append(tok)
        if any(c(ids, tok) for c in criteria):
            break
    return ids[len(prompt) :]


def _counting_model(ids):
    """Greedy continuation is last+1 (mod V)."""
    x = torch.zeros(V)
    x[(ids[-1] + 1) % V] = 5.0
    return x


class StopAfterToken(StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, token_ids, new_token):
        return new_token == self.token


def test_user_stopping_criteria_and_builtins_stop_generation():
    base = SamplingConfig(max_new_tokens=10)
    assert _generate(_counting_model, [10], base) == list(range(11, 21))
    user = SamplingConfig(max_new_tokens=10, stopping_criteria=[StopAfterToken(14)])
    assert _generate(_counting_model, [10], user) == [11, 12, 13, 14]
    assert _generate(_counting_model, [10], SamplingConfig(max_new_tokens=10, stop_token_ids=[13])) == [11, 12, 13]
    assert _generate(_counting_model, [10], base, eos=[12]) == [11, 12]
    no_eos = SamplingConfig(max_new_tokens=10, ignore_eos=True)
    assert _generate(_counting_model, [10], no_eos, eos=[12]) == list(range(11, 21))


def test_stop_on_strings_checks_generated_tail_and_trims():
    detok = lambda ids: "".join(chr(ord("a") + (i % 26)) for i in ids)  # noqa: E731
    cfg = SamplingConfig(max_new_tokens=10, stop_strings=["def"])
    # prompt "abc"; the counting model generates d, e, f -> "def" stops right after f
    out = _generate(_counting_model, [0, 1, 2], cfg, detokenize=detok)
    assert out == [3, 4, 5]
    crit = StopOnStrings(["de", "xyz"], detok, prompt_len=0)
    assert crit([3, 4], 4) and crit.matched == "de"
    assert crit.trim("abcdefg") == "abc"
    # a stop string inside the prompt must not trigger
    assert not StopOnStrings(["ab"], detok, prompt_len=2)([0, 1, 5], 5)
    assert StopOnTokens([1, 2])([0, 2], 2) and not StopOnTokens([1])([0, 2], 2)
    with pytest.raises(SamplingConfigError, match="stop_strings"):
        build_stopping_criteria(cfg, detokenize=None)


# ---------------------------------------------------------------- config validation


INVALID = [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("temperature", {"temperature": float("inf")}),
    ("temperature", {"temperature": "0.7"}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -1}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("presence_penalty", {"presence_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("n", {"n": 0}),
    ("n", {"n": 2}),  # greedy with n > 1
    ("n", {"n": 3, "beam_width": 2}),
    ("beam_width", {"beam_width": 0}),
    ("temperature", {"beam_width": 2, "temperature": 0.8}),
    ("max_new_tokens", {"max_new_tokens": 0}),
    ("max_new_tokens", {"max_new_tokens": True}),
    ("stop_token_ids", {"stop_token_ids": [1, "2"]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": [V]}),
    ("stop_strings", {"stop_strings": [""]}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 1.5}),
    ("length_penalty", {"length_penalty": float("nan")}),
    ("logits_processors", {"logits_processors": [3]}),
    ("ignore_eos", {"ignore_eos": "yes"}),
]


@pytest.mark.parametrize("field_name,kwargs", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_raises_naming_field(field_name, kwargs):
    with pytest.raises(SamplingConfigError, match=field_name) as exc:
        SamplingConfig(**kwargs).validate(vocab_size=V)
    assert isinstance(exc.value, ValueError)


def test_valid_configs_pass():
    SamplingConfig().validate(V)
    SamplingConfig(
        temperature=1, top_k=V + 10, top_p=1, min_p=0, n=4, seed=2**64 - 1, stop_token_ids=[V - 1]
    ).validate(V)
    SamplingConfig(beam_width=4, n=4, length_penalty=-1.0).validate()


def test_penalties_alone_stay_off_the_host():
    """Penalties run in the fused kernel (device-resident counts); processors, logprobs and min_tokens need
    the host sampler."""
    for kw in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.5}):
        cfg = SamplingConfig(**kw)
        assert cfg.needs_penalties and not cfg.needs_host_sampling
    for kw in ({"logprobs": 0}, {"min_tokens": 1}, {"logits_processors": [lambda ids, x: x]}):
        assert SamplingConfig(repetition_penalty=1.2, **kw).needs_host_sampling


def test_from_generation_config_honours_do_sample():
    # HF fills temperature=1.0 / top_k=50 even for greedy; those must not turn sampling on.
    greedy = SamplingConfig.from_generation_config(GenerationConfig(max_new_tokens=7, repetition_penalty=1.2))
    assert greedy.is_greedy and greedy.top_k == 0 and greedy.max_new_tokens == 7 and greedy.repetition_penalty == 1.2
    greedy2 = SamplingConfig.from_generation_config(GenerationConfig(do_sample=False, temperature=0.6, top_k=10))
    assert greedy2.is_greedy and greedy2.top_k == 0
    sampled = SamplingConfig.from_generation_config(GenerationConfig(do_sample=True, top_p=0.9))
    assert sampled.temperature == 1.0 and sampled.top_k == 50 and sampled.top_p == 0.9
    beam_cfg = GenerationConfig(num_beams=4, num_return_sequences=2)
    beams = SamplingConfig.from_generation_config(beam_cfg, max_new_tokens=3)
    assert beams.beam_width == 4 and beams.n == 2 and beams.max_new_tokens == 3 and beams.is_greedy
    with pytest.raises(SamplingConfigError, match="temperature"):
        SamplingConfig.from_generation_config(GenerationConfig(do_sample=True, num_beams=2))
