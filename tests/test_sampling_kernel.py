"""The fused sampling kernel (backends/triton/kernels/sampling.py) and its engine path.

On CPU the kernel runs under the Triton interpreter; there it must pick exactly the torch reference's tokens
(same Philox words, same kept set), so the chi-square test of the reference's draws against the reference
distribution covers the kernel's draws too. With a GPU the ``gpu`` tests run the chi-square on the compiled
kernel's own draws."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import autodeploy  # noqa: E402
from autodeploy import SamplingConfig  # noqa: E402
from autodeploy.backends.triton.kernels import sampling as S  # noqa: E402
from autodeploy.backends.triton.kernels.argmax import argmax_rows  # noqa: E402
from autodeploy.runtime.engine import Engine  # noqa: E402
from autodeploy.runtime.hooks import LogitsProcessor  # noqa: E402
from helpers import drive  # noqa: E402
from model_zoo import make_model  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
V = 1000

# (temperature, top_k, top_p, min_p) per row: every filter alone, combined, disabled in each way, and greedy
ROWS = [(0.0, 0, 1.0, 0.0), (0.8, 20, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 50, 0.8, 0.05),
        (0.6, 0, 1.0, 0.1), (1.0, 5000, 1.0, 0.0), (2.0, 100, 0.5, 0.0), (0.7, 3, 0.95, 0.2)]


def _params(rows, steps, seeds=None):
    seeds = seeds if seeds is not None else [1000 + i for i in range(len(rows))]
    return S.pack_params([S.param_row(*r, seed=s) for r, s in zip(rows, seeds)], steps)


def _fields(rows):
    t = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    return (t, torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows], dtype=torch.float32),
            torch.tensor([r[3] for r in rows], dtype=torch.float32))


def _logits(b, v=V, seed=0, scale=3.0, ties=False):
    x = torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale
    if ties:  # many exact ties, at the top and at the filter boundaries
        x = torch.round(x * 2) / 2
    return x


def _kernel_support(x, rows, th):
    """The kernel's kept set from its threshold (tokens > lo whose e_i >= min_p), -inf tokens excluded."""
    t, _, _, mp = _fields(rows)
    t = torch.where(t > 0, t, torch.ones_like(t))
    e = torch.exp((x - x.max(dim=1, keepdim=True).values) / t[:, None])
    return (x > th[:, None]) & (e >= mp[:, None])


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper chi-square quantile (Wilson-Hilferty; z = 3.719: p = 1e-4)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


# --------------------------------------------------------------------------------------------- Philox


def _assert_counted(state, before, got, pen_rows):
    """The penalty state gained exactly one count per penalized row's sampled token (a word is
    ``count << 1 | in_prompt``)."""
    after = before.clone()
    for r, pr in enumerate(pen_rows):
        if pr >= 0:
            after[pr, got[r]] += 2
    assert torch.equal(state.cpu(), after.cpu()), "the state did not count exactly the penalized rows' tokens"


def test_philox_known_answers():
    """Random123's published Philox-4x32-10 test vectors."""
    m = 0xFFFFFFFF
    cases = [((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((m, m, m, m, m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for args, want in cases:
        assert tuple(int(w) for w in S.philox4x32(*args)) == want


@triton.jit
def _uniform_probe(out_ptr, k0, k1, step, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    u = S._philox_u(k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), offs.to(tl.uint32),
                    step.to(tl.uint32, bitcast=True))
    tl.store(out_ptr + offs, u, mask=offs < n)


@pytest.mark.parametrize("seed,step", [(0, 0), (2**64 - 3, 7), (123456789012345, 2**31 - 1)])
def test_kernel_philox_words_match_torch(seed, step):
    row = S.param_row(1.0, 0, 1.0, 0.0, seed)
    out = torch.empty(1024, device=DEV)
    _uniform_probe[(1,)](out, row[4], row[5], step, 1024, BLOCK=1024)
    f = S._unpack(S.pack_params([row], [step]))
    ref = S.philox_uniform(f["seed_lo"], f["seed_hi"], f["step"], 1024)[0]
    assert torch.equal(out.cpu(), ref)  # bit for bit
    assert 0.0 < float(ref.min()) and float(ref.max()) < 1.0


# ----------------------------------------------------------------- kernel == reference, exact support sets


@pytest.mark.parametrize("tiling", [None, (512, 64)], ids=["one_tile", "two_tiles"])
@pytest.mark.parametrize("case", ["random", "ties", "neg_inf", "flat"])
def test_kernel_support_and_tokens_match_reference(case, tiling):
    x = _logits(len(ROWS), seed=3, ties=case == "ties", scale=0.05 if case == "flat" else 3.0)
    if case == "neg_inf":  # banned tokens everywhere, and a row with fewer allowed tokens than its top_k
        x[:, ::3] = float("-inf")
        x[5, 40:] = float("-inf")
    t, k, p, mp = _fields(ROWS)
    kept = S.reference_kept(x, t, k, p, mp) & (x > float("-inf"))
    tile, cand = tiling or (None, None)
    paths = set()
    for step in range(2):
        prm = _params(ROWS, [step] * len(ROWS))
        th = torch.empty(len(ROWS), device=DEV)
        path = torch.empty(len(ROWS), dtype=torch.int32, device=DEV)
        got = S.fused_sample(x.to(DEV), prm, threshold_out=th, path_out=path, tile=tile, candidates=cand).cpu()
        assert torch.equal(got, S.reference_sample(x, prm)), "kernel and torch reference drew different tokens"
        path = path.cpu()
        filtered = torch.isin(path, torch.tensor([2, 3]))
        assert torch.equal(_kernel_support(x, ROWS, th.cpu())[filtered], kept[filtered]), "support sets differ"
        assert bool(kept[torch.arange(len(ROWS)), got].all()), "a token outside its row's kept set"
        assert got[0] == x[0].argmax() and path[0] == 0 and path[5] == 1  # greedy; top_k beyond the vocabulary
        paths |= set(path.tolist())
    assert 2 in paths, "no row took the candidate path"
    if case == "flat":
        assert 3 in paths, "no row fell back to the whole row (top-p over a flat distribution should)"
    # the sets themselves, from first principles
    desc = x.sort(dim=1, descending=True).values
    assert int(kept[1].sum()) >= 20 and bool((x[1][kept[1]] >= desc[1, 19]).all())  # top-20, ties kept
    assert int(kept[5].sum()) == int((x[5] > float("-inf")).sum())  # top_k beyond the vocabulary: all kept
    assert int(kept[7].sum()) <= 3 or case == "ties"


def test_reference_kept_set_from_first_principles():
    """The reference's kept set (topk/cumsum, fast) against the definition written out in O(V^2)."""
    for trial in range(6):
        g = torch.Generator().manual_seed(trial)
        x = torch.round(torch.randn(6, 300, generator=g) * 4) / 2  # many ties
        x[:, ::7] = float("-inf")
        t = torch.rand(6, generator=g) + 0.3
        k = torch.randint(0, 60, (6,), generator=g)
        p = torch.rand(6, generator=g) * 0.9 + 0.05
        mp = torch.tensor([0.0, 0.0, 0.0, 0.05, 0.2, 0.0])
        kept = S.reference_kept(x, t, k, p, mp)
        for r in range(6):
            xr = x[r]
            e = torch.exp((xr - xr.max()) / t[r]).double()
            greater = xr[None, :] > xr[:, None]  # [i, j]: x_j > x_i
            by_k = greater.sum(1) < k[r] if 0 < k[r] < int((xr > float("-inf")).sum()) else torch.ones(300, dtype=bool)
            mass = e * by_k
            want = by_k & ((greater.double() * mass[None, :]).sum(1) < p[r] * mass.sum()) & (e >= mp[r])
            finite = xr > float("-inf")
            assert torch.equal(kept[r] & finite, want & finite), (trial, r)


def test_top_p_one_and_min_p_zero_keep_everything():
    x = _logits(2, seed=5)
    rows = [(1.0, 0, 1.0, 0.0), (0.5, V, 1.0, 0.0)]
    th = torch.empty(2, device=DEV)
    S.fused_sample(x.to(DEV), _params(rows, [0, 0]), threshold_out=th)
    assert torch.equal(th.cpu(), torch.full((2,), float("-inf")))  # no search ran, nothing cut
    assert bool(S.reference_kept(x, *_fields(rows)).all())


# ------------------------------------------------------------------------------------- distribution


def test_reference_draws_fit_reference_distribution():
    """Chi-square of many draws per row (per-row different filters) against :func:`reference_probs`, and every
    token of the kept set drawn (the logits are flat enough that each has an expected count >= 15)."""
    rows = [(1.5, 30, 1.0, 0.0), (1.0, 0, 0.08, 0.0), (2.0, 40, 0.9, 0.3), (1.2, 0, 1.0, 0.4)]
    x = _logits(len(rows), seed=9, scale=0.8)
    probs = S.reference_probs(x, *_fields(rows))
    draws = 2000
    xs = x.repeat_interleave(draws, dim=0)
    prm = _params([r for r in rows for _ in range(draws)], [s for _ in rows for s in range(draws)],
                  seeds=[7 + i for i in range(len(rows)) for _ in range(draws)])
    toks = S.reference_sample(xs, prm).view(len(rows), draws)
    for r in range(len(rows)):
        support = probs[r] > 0
        counts = torch.bincount(toks[r], minlength=V).double()
        assert bool(support[toks[r]].all()), f"row {r}: a token outside the kept set"
        n_kept = int(support.sum())
        assert 5 <= n_kept < 200, f"row {r}: the test needs a moderate kept set, got {n_kept}"
        expected = probs[r][support] * draws
        assert float(expected.min()) >= 15
        assert bool((counts[support] > 0).all()), f"row {r}: a kept token was never drawn"
        chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
        assert chi2 < _chi2_critical(n_kept - 1), f"row {r}: chi2 {chi2:.1f} with {n_kept - 1} dof"


def test_temperature_changes_the_distribution():
    """A broken temperature would still pass support tests; the chi-square must notice it."""
    rows = [(0.5, 10, 1.0, 0.0)]
    x = _logits(1, seed=2, scale=1.0)
    probs = S.reference_probs(x, *_fields(rows))[0]
    wrong = S.reference_probs(x, *_fields([(1.0, 10, 1.0, 0.0)]))[0]
    draws = 2000
    prm = _params(rows * draws, list(range(draws)), seeds=[3] * draws)
    counts = torch.bincount(S.reference_sample(x.expand(draws, V), prm), minlength=V).double()
    sup = probs > 0
    chi = lambda p: float(((counts[sup] - p[sup] * draws) ** 2 / (p[sup] * draws)).sum())  # noqa: E731
    assert chi(probs) < _chi2_critical(int(sup.sum()) - 1) < chi(wrong)


# --------------------------------------------------------------------------------- reproducibility


def test_seeded_rows_do_not_depend_on_the_batch():
    x = _logits(6, seed=11)
    row = ROWS[3]
    alone = [int(S.fused_sample(x[2:3].to(DEV), _params([row], [s], seeds=[42]))[0]) for s in range(3)]
    for s in range(3):
        others = [ROWS[1], ROWS[0], row, ROWS[6], ROWS[2], ROWS[7]]
        got = S.fused_sample(x.to(DEV), _params(others, [9, 1, s, 4, 0, 2], seeds=[1, 2, 42, 4, 5, 6]))
        assert int(got[2]) == alone[s]
    # another seed or another step gives another stream
    many = [int(S.reference_sample(x[2:3], _params([row], [s], seeds=[42]))[0]) for s in range(12)]
    assert many[:3] == alone and len(set(many)) > 1
    other = [int(S.reference_sample(x[2:3], _params([row], [s], seeds=[43]))[0]) for s in range(12)]
    assert other != many


# -------------------------------------------------------------------------- greedy rows, dtypes, errors


def test_greedy_rows_are_exactly_argmax():
    x = _logits(6, seed=4, ties=True)
    x[1, :] = 1.0  # all tied: lowest index
    x[2, 7] = float("nan")  # NaN wins (torch.argmax)
    x[3, :] = float("-inf")
    x[4, 100:] = float("-inf")
    x[4, 50] = x[4, 20] = x[4, :100].max() + 1
    rows = [(0.0, 5, 0.5, 0.1)] * 5 + [(1.0, 3, 1.0, 0.0)]  # greedy ignores the filters; one sampled row
    got = S.fused_sample(x.to(DEV), _params(rows, [0] * 6))
    assert torch.equal(got[:5].cpu(), argmax_rows(x)[:5])
    assert got[1] == 0 and got[2] == 7 and got[4] == 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_and_host_out(dtype):
    x = _logits(4, seed=6).to(dtype)
    prm = _params(ROWS[:4], [0, 1, 2, 3])
    host = torch.full((4,), -1, dtype=torch.int64)
    sums = torch.zeros(4, device=DEV)
    if DEV == "cuda":  # the kernel reads the parameters and writes the tokens through mapped host memory
        prm, host = prm.pin_memory(), host.pin_memory()
    x[2, 5] = float("nan") if dtype == torch.bfloat16 else float("inf")
    got = S.fused_sample(x.to(DEV), prm, host_out=host, row_sums=sums)
    assert torch.equal(host, got.cpu())
    ref_sums = x.float().sum(dim=1)
    assert torch.allclose(sums.cpu()[[0, 1, 3]], ref_sums[[0, 1, 3]], rtol=1e-3, atol=1e-2)
    assert not math.isfinite(float(sums[2]))  # the finiteness check sees the bad logit (its token: unspecified)
    assert torch.equal(got.cpu()[[0, 1, 3]], S.reference_sample(x, prm)[[0, 1, 3]])


def test_bad_arguments_raise():
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="params must be int32"):
        S.sample_rows(x, _params(ROWS[:3], [0] * 3))
    with pytest.raises(ValueError, match="host_out"):
        S.sample_rows(x, _params(ROWS[:2], [0] * 2), host_out=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="logits"):
        S.sample_rows(torch.zeros(10), _params(ROWS[:1], [0]))


def test_sampler_streams_match_the_fused_sampler():
    """The host-assisted Sampler with ``streams`` draws what the fused sampler draws on the same logits."""
    from autodeploy.runtime.sampling import Sampler

    x = _logits(4, seed=13)
    cfgs = [SamplingConfig(temperature=r[0], top_k=r[1], top_p=r[2], min_p=r[3]) for r in ROWS[:4]]
    streams = [(50 + i, 3 + i) for i in range(4)]
    out = Sampler().sample(x, cfgs, [[1]] * 4, [1] * 4, streams=streams, return_logprobs=True)
    want = S.sample_rows(x, _params(ROWS[:4], [st for _, st in streams], seeds=[sd for sd, _ in streams]))
    assert torch.equal(out.tokens, want)
    assert bool(torch.isfinite(out.logprobs).all()) and bool((out.logprobs <= 0).all())


# ------------------------------------------------------------------------------------------ penalties

# (repetition, frequency, presence) per row, or None: no penalty state row
PENS = [(1.3, 0.5, 0.2), None, (0.7, 0.0, 1.0), (1.0, -1.0, 0.3), (2.0, 0.0, 0.0), None, (1.2, 0.1, -0.5),
        (1.0, 0.0, 0.7)]


def _pen_case(b, v=V, seed=0):
    """Per row a prompt and outputs with repeated tokens, prompt-only tokens, tokens in both, and an empty
    output (a fresh request); the host reference's token lists."""
    g = torch.Generator().manual_seed(seed)
    prompts, outs = [], []
    for i in range(b):
        prompt = torch.randint(0, v, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        out = [] if i == 2 else torch.randint(0, 40, (int(torch.randint(1, 30, (1,), generator=g)),),
                                              generator=g).tolist() + prompt[:2] + [v - 1] * 3
        prompts.append(prompt)
        outs.append(out)
    return prompts, outs


def _pen_setup(rows, pens, steps, prompts, outs, v=V, seeds=None, dtype=torch.int32, dev=DEV):
    """Parameters with state rows assigned in reverse (rows of the state need not follow the batch), the
    state, and the host path's penalized logits function."""
    from autodeploy.runtime.sampling import apply_penalties

    b = len(rows)
    seeds = seeds if seeds is not None else [1000 + i for i in range(b)]
    pen_rows = [-1 if p is None else b + 1 - i for i, p in enumerate(pens)]
    kw = [{} if p is None else dict(repetition_penalty=p[0], frequency_penalty=p[1], presence_penalty=p[2])
          for p in pens]
    prm = S.pack_params([S.param_row(*r, seed=sd, **k) for r, sd, k in zip(rows, seeds, kw)], steps,
                        pen_rows=pen_rows)
    plain = S.pack_params([S.param_row(*r, seed=sd) for r, sd in zip(rows, seeds)], steps)
    state = torch.full((b + 2, v), 12345, dtype=dtype)  # garbage: rows are rewritten whole
    sel = [i for i in range(b) if pen_rows[i] >= 0]
    S.write_penalty_rows(state, [pen_rows[i] for i in sel], [prompts[i] for i in sel], [outs[i] for i in sel])

    def host(x):
        return apply_penalties(x.float().clone(), [p + o for p, o in zip(prompts, outs)], [len(p) for p in prompts],
                               [p[0] if p else 1.0 for p in pens], [p[2] if p else 0.0 for p in pens],
                               [p[1] if p else 0.0 for p in pens])
    return prm, plain, state.to(dev), pen_rows, host


@triton.jit
def _penalty_probe(x_ptr, pen_ptr, out_ptr, v, p_row, rep, freq, pres, BLOCK: tl.constexpr):
    """The kernel's penalized logits of one row, as its programs see them."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < v
    pen_row = pen_ptr + tl.maximum(p_row, 0).to(tl.int64) * v
    lim = tl.where(p_row >= 0, v, 0)
    x = S._load_row(x_ptr, offs, ok, pen_row, rep, freq, pres, lim, True)
    tl.store(out_ptr + offs, x, mask=ok)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16])
def test_kernel_penalized_logits_equal_host_path_bit_for_bit(dtype):
    b = len(PENS)
    x = _logits(b, seed=31)
    x[:, 5] = 0.0
    x[1, 7] = -0.0
    x[:, 9] = float("-inf")  # a banned token, also seen
    prompts, outs = _pen_case(b, seed=31)
    for r in range(b):
        prompts[r] += [5, 9]
    prm, _, state, pen_rows, host = _pen_setup([ROWS[0]] * b, PENS, [0] * b, prompts, outs, dtype=dtype)
    want = host(x)
    assert not torch.equal(want, x), "the case penalizes nothing"
    assert torch.equal(S.reference_penalize(x, prm, state.cpu()), want)
    for r, p in enumerate(PENS):
        out = torch.empty(V, device=DEV)
        rp, fr, pr = p if p is not None else (1.0, 0.0, 0.0)
        _penalty_probe[(1,)](x[r].to(DEV).contiguous(), state, out, V, pen_rows[r], rp, fr, pr, BLOCK=1024,
                             enable_fp_fusion=False)
        assert torch.equal(out.cpu(), want[r]), f"row {r}: penalized logits differ from the host path"


@pytest.mark.parametrize("case,tiling,step", [("random", None, 0), ("ties", (256, 16), 1), ("flat", (256, 16), 2)])
def test_kernel_with_penalties_equals_host_path(case, tiling, step):
    """Tokens of the penalized launch equal the host path's (torch penalties, then the same kernel without a
    state), greedy rows are the argmax of the penalized logits, and exactly the penalized rows count their
    token. Every path of the kernel runs (``path_out``)."""
    b = len(ROWS)
    x = _logits(b, seed=5, ties=case == "ties", scale=0.05 if case == "flat" else 3.0)
    prompts, outs = _pen_case(b, seed=6)
    for r in range(b):  # the likeliest tokens seen: in the prompt (even rows, row 2 has no output) or generated
        (prompts if r % 2 == 0 else outs)[r] += x[r].topk(4).indices.tolist()
    rows = list(ROWS)
    rows[4] = (0.0, 0, 1.0, 0.0)  # a second greedy row, penalized
    rows[5] = (1.1, 0, 1.0, 0.0)  # an unfiltered sampled row (tile winners), not penalized
    rows[7] = (0.9, 0, 1.0, 0.0)  # ... and a penalized one
    tile, cand = tiling or (None, None)
    prm, plain, state, pen_rows, host = _pen_setup(rows, PENS, [step] * b, prompts, outs)
    before = state.clone().cpu()
    path = torch.empty(b, dtype=torch.int32, device=DEV)
    got = S.fused_sample(x.to(DEV), prm, path_out=path, tile=tile, candidates=cand, penalties=state).cpu()
    px = host(x)
    assert torch.equal(got, S.fused_sample(px.to(DEV), plain, tile=tile, candidates=cand).cpu())
    assert torch.equal(got, S.reference_sample(px, plain))
    assert not torch.equal(got, S.reference_sample(x, plain)), "the penalties changed no token"
    for r in (0, 4):
        assert int(got[r]) == int(px[r].argmax())
    _assert_counted(state, before, got, pen_rows)
    assert set(path.cpu().tolist()) == {0, 1, 2, 3}  # greedy, tile winners, candidates, whole row


def test_kernel_counts_drive_a_multi_step_generation():
    """Ten steps where only the kernel updates the state equal ten host-path steps from token lists, for
    greedy and seeded sampled rows (the logits depend on the tokens so far, as a model's would)."""
    b, v = 4, 300
    rows = [(0.0, 0, 1.0, 0.0), (0.9, 20, 1.0, 0.0), (1.0, 0, 0.9, 0.05), (0.0, 0, 1.0, 0.0)]
    pens = [(1.5, 0.3, 0.1), (1.2, 0.2, 0.4), (1.0, 0.8, 0.0), None]
    prompts = [[1, 2, 2, 3], [4, 5], [6], [7, 8]]
    base = _logits(b, v=v, seed=8)
    toks = [[] for _ in range(b)]
    prm0, _, state, _, _ = _pen_setup(rows, pens, [0] * b, prompts, toks, v=v)
    changed = 0
    for step in range(8):
        # a sharp, slowly moving peak: unpenalized, the greedy rows would repeat their tokens
        x = base + 8.0 * torch.tensor([[math.cos(c * 0.05 + step * 0.02)for c in range(v)]] * b)
        got = S.fused_sample(x.to(DEV), S.pack_params(prm0.tolist(), [step] * b), penalties=state).cpu().tolist()
        _, plain, _, _, host = _pen_setup(rows, pens, [step] * b, prompts, toks, v=v)
        px = host(x)
        want = S.reference_sample(px, plain).tolist()
        assert got == want, f"step {step}"
        changed += int(not torch.equal(S.reference_sample(x, plain), S.reference_sample(px, plain)))
        for r in range(b):
            toks[r].append(want[r])
    assert changed >= 4 and len(set(toks[0])) > 1 and len(set(toks[3])) == 1


def test_penalty_state_encoding_and_dtype():
    assert S.penalty_state_dtype(16383) == torch.int16 and S.penalty_state_dtype(16384) == torch.int32
    st = torch.full((3, 10), 7, dtype=torch.int16)
    S.write_penalty_rows(st, [2, 0], [[1, 1, 4], []], [[4, 4, 9], [3]])
    assert st[2].tolist() == [0, 1, 0, 0, 5, 0, 0, 0, 0, 2] and st[0].tolist() == [0, 0, 0, 2] + [0] * 6
    assert st[1].tolist() == [7] * 10  # untouched
    with pytest.raises(ValueError, match="token ids"):
        S.write_penalty_rows(st, [0], [[10]], [[]])


def test_penalty_arguments_are_checked():
    x = _logits(2)
    prm = S.pack_params([S.param_row(*ROWS[0], seed=1, repetition_penalty=1.2)] * 2, [0, 0], pen_rows=[0, 0])
    with pytest.raises(ValueError, match="distinct"):
        S.sample_rows(x, prm, penalties=torch.zeros(2, V, dtype=torch.int32))
    prm = S.pack_params([S.param_row(*ROWS[0], seed=1)] * 2, [0, 0], pen_rows=[0, 3])
    with pytest.raises(ValueError, match="pen_row"):
        S.sample_rows(x, prm, penalties=torch.zeros(2, V, dtype=torch.int32))
    with pytest.raises(ValueError, match="penalties must be"):
        S.sample_rows(x, prm, penalties=torch.zeros(2, V + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="penalties must be"):
        S.sample_rows(x, prm, penalties=torch.zeros(4, V, dtype=torch.float32))


# ------------------------------------------------------------------------------------ engine level


@pytest.fixture(scope="module")
def cm():
    model = make_model("llama", seed=11)
    return autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, max_num_tokens=64)


class _Noop(LogitsProcessor):
    """Forces the host-assisted sampler path without changing any logit."""

    def __call__(self, token_ids, logits):
        return logits


def _sampled(seed, n_new=10, **kw):
    return SamplingConfig(max_new_tokens=n_new, temperature=0.9, top_k=40, top_p=0.95, seed=seed, ignore_eos=True,
                          **kw)


def test_engine_fused_path_async_equals_sync(cm):
    prompts = [[3, 4, 5], [9, 9, 1, 2], [7], [1, 2, 3, 4, 5, 6]]
    cfgs = [_sampled(1), SamplingConfig(max_new_tokens=12, ignore_eos=True), _sampled(2, n_new=7, min_p=0.05),
            SamplingConfig(max_new_tokens=9, temperature=1.2, seed=5, ignore_eos=True)]
    arrivals = [(0, p, c) for p, c in zip(prompts, cfgs)] + [(3, [5, 5], _sampled(8))]
    sync_engine, async_engine = Engine(cm, async_scheduling=False), Engine(cm, async_scheduling=True)
    calls = []
    real = async_engine.sampler.sample
    async_engine.sampler.sample = lambda *a, **k: calls.append(1) or real(*a, **k)
    sync, got = drive(sync_engine, arrivals), drive(async_engine, arrivals)
    assert [o.samples for o in got] == [o.samples for o in sync]
    assert async_engine.stats.num_async_steps > 0, "no step was launched ahead"
    assert not calls, "device-sampled batches went through the host sampler"
    assert async_engine.kv.all_free()
    greedy = Engine(cm).generate([prompts[1]], cfgs[1])[0].output_ids
    assert got[1].output_ids == greedy  # a greedy request sharing sampled batches keeps its exact tokens


def test_engine_seeded_requests_reproduce_across_batches_and_paths(cm):
    cfg = _sampled(1234, n_new=12)
    alone = Engine(cm, async_scheduling=True).generate([[3, 4, 5]], cfg)[0].output_ids
    others = [SamplingConfig(max_new_tokens=9, temperature=1.3, seed=s, ignore_eos=True) for s in range(3)]
    mixed = Engine(cm, async_scheduling=True).generate([[9, 9], [3, 4, 5], [1] * 7, [2, 3]],
                                                       [others[0], cfg] + others[1:])
    assert mixed[1].output_ids == alone
    # the same request on the host-assisted path (a processor that changes nothing) draws the same tokens
    hosted = Engine(cm).generate([[3, 4, 5]], _sampled(1234, n_new=12, logits_processors=[_Noop()]))[0]
    assert hosted.output_ids == alone
    # ... and so does it when a request asking for logprobs forces that path on the whole batch
    pen = SamplingConfig(max_new_tokens=6, temperature=1.0, repetition_penalty=1.3, seed=3, ignore_eos=True,
                         logprobs=0)
    assert Engine(cm).generate([[3, 4, 5], [8, 8]], [cfg, pen])[0].output_ids == alone
    other_seed = Engine(cm).generate([[3, 4, 5]], _sampled(1235, n_new=12))[0].output_ids
    assert other_seed != alone


@pytest.mark.skipif(not INTERPRET, reason="runs the kernel on the CPU engine's logits (interpreter only)")
def test_engine_fused_path_through_the_kernel(cm, monkeypatch):
    """The engine's per-row parameters (seeds, generated-token indices) drive the Triton kernel (interpreted
    here) to the tokens of its torch twin, greedy rows included."""
    import autodeploy.runtime.engine as engine_mod

    prompts = [[3, 4, 5], [9, 9, 1, 2], [7]]
    cfgs = [_sampled(1, n_new=5), SamplingConfig(max_new_tokens=5, ignore_eos=True), _sampled(2, n_new=4, min_p=0.1)]
    want = Engine(cm, async_scheduling=True).generate(prompts, cfgs)
    launches = []
    monkeypatch.setattr(engine_mod, "sample_rows",
                        lambda lg, prm, host_out=None, **kw: launches.append(1) or S.fused_sample(
                            lg, prm, host_out, **kw))
    got = Engine(cm, async_scheduling=True).generate(prompts, cfgs)
    assert launches and [o.samples for o in got] == [o.samples for o in want]


def test_engine_unseeded_requests_follow_torch_manual_seed(cm):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, ignore_eos=True, n=2)
    torch.manual_seed(5)
    a = Engine(cm).generate([[3, 4, 5]], cfg)[0].samples
    torch.manual_seed(5)
    b = Engine(cm).generate([[3, 4, 5]], cfg)[0].samples
    assert a == b and a[0] != a[1]


def test_bench_workload_samples_and_reports_it(cm):
    from autodeploy.entrypoints.bench import make_workload, run_workload

    wl = make_workload(3, "3:5", "4", float("inf"), cm.vocab_size, 0)
    cfg = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.0}
    res = run_workload(Engine(cm), wl, progress=False, sampling=cfg)
    assert res["sampling"] == cfg and res["errors"] == 0 and res["output_tokens"] == 12
    assert run_workload(Engine(cm), wl, progress=False)["sampling"] == {"temperature": 0.0}


def test_bench_cli_rejects_bad_sampling_settings(capsys):
    from autodeploy.entrypoints.cli import main

    assert main(["bench", "--num-requests", "1", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_kernel_draws_fit_reference_distribution():
    """The compiled kernel's own draws (fast exp/log on the device) against the reference distribution."""
    rows = [(0.8, 200, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 50, 0.8, 0.05), (0.7, 0, 1.0, 0.1)]
    v, draws = 32000, 8192
    x = _logits(len(rows), v=v, seed=21, scale=2.0)
    probs = S.reference_probs(x, *_fields(rows))
    for r, row in enumerate(rows):
        prm = _params([row] * draws, list(range(draws)), seeds=[99] * draws).pin_memory()
        toks = S.sample_rows(x[r:r + 1].to("cuda", torch.bfloat16).expand(draws, v).contiguous(), prm).cpu()
        p = S.reference_probs(x[r:r + 1].to(torch.bfloat16).float(), *_fields([row]))[0]
        assert bool((p[toks] > 0).all()), f"row {r}: a token outside the kept set"
        counts = torch.bincount(toks, minlength=v).double()
        big = p * draws >= 5  # pool the tail so every cell expects >= 5
        obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
        exp = torch.cat([p[big] * draws, (p[~big].sum() * draws).reshape(1)])
        keep = exp > 0
        chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        assert chi2 < _chi2_critical(int(keep.sum()) - 1), f"row {r}: chi2 {chi2:.1f}"
    assert probs.shape == (len(rows), v)


@pytest.mark.gpu
def test_gpu_kernel_matches_reference_at_llama_vocab():
    """128k vocabulary, bf16, pinned parameters and host output, reproducible across batch compositions."""
    v, b = 128256, 8
    x = _logits(b, v=v, seed=23, scale=3.0).to(torch.bfloat16)
    prm = _params(ROWS, list(range(b))).pin_memory()
    host = torch.empty(b, dtype=torch.int64).pin_memory()
    th = torch.empty(b, device="cuda")
    got = S.sample_rows(x.cuda(), prm, host_out=host)
    S.fused_sample(x.cuda(), prm, threshold_out=th)
    torch.cuda.synchronize()
    assert torch.equal(host, got.cpu())
    xf = x.float()
    kept = S.reference_kept(xf, *_fields(ROWS)) & (xf > float("-inf"))
    sampled = torch.tensor([r[0] > 0 for r in ROWS])
    mismatch = (_kernel_support(xf, ROWS, th.cpu()) != kept)[sampled].sum()
    assert int(mismatch) <= 2, "support sets differ beyond fp rounding at the boundary"
    assert bool(kept[torch.arange(b), got.cpu()].all())
    assert int(got[0]) == int(xf[0].argmax())
    alone = S.sample_rows(x[3:4].cuda(), _params([ROWS[3]], [3], seeds=[1003]).pin_memory())
    assert int(alone[0]) == int(got[3])
    ref = S.reference_sample(xf, prm)
    assert int((ref != got.cpu()).sum()) <= 1  # fast exp/log may flip a near-tie


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.int32, torch.int16])
def test_gpu_kernel_penalties_at_llama_vocab(state_dtype):
    """128k vocabulary, bf16 logits, pinned parameters: the compiled kernel's penalized logits equal torch's
    on the GPU bit for bit, so its tokens equal the host path's (torch penalties, then the kernel without a
    state) exactly, greedy rows are the penalized argmax, and the state counts exactly the penalized rows."""
    from autodeploy.runtime.sampling import apply_penalties

    v, b = 128256, len(ROWS)
    x = _logits(b, v=v, seed=29, scale=3.0).to(torch.bfloat16)
    prompts, outs = _pen_case(b, v=v, seed=29)
    for r in range(b):
        (prompts if r % 2 == 0 else outs)[r] += x[r].float().topk(8).indices.tolist()
    rows = list(ROWS)
    rows[4] = (0.0, 0, 1.0, 0.0)
    rows[5] = (1.1, 0, 1.0, 0.0)
    prm, plain, state, pen_rows, _ = _pen_setup(rows, PENS, list(range(b)), prompts, outs, v=v, dtype=state_dtype,
                                                dev="cuda")
    sel = [i for i in range(b) if pen_rows[i] >= 0]
    written = torch.full_like(state, 777)  # the engine writes rows on the device: pinned upload, index_put
    S.write_penalty_rows(written, [pen_rows[i] for i in sel], [prompts[i] for i in sel], [outs[i] for i in sel])
    assert torch.equal(written[[pen_rows[i] for i in sel]], state[[pen_rows[i] for i in sel]])
    xc = x.cuda()
    want = apply_penalties(xc.float(), [p + o for p, o in zip(prompts, outs)], [len(p) for p in prompts],
                           [p[0] if p else 1.0 for p in PENS], [p[2] if p else 0.0 for p in PENS],
                           [p[1] if p else 0.0 for p in PENS])
    for r, p in enumerate(PENS):
        out = torch.empty(v, device="cuda")
        rp, fr, pr = p if p is not None else (1.0, 0.0, 0.0)
        _penalty_probe[(triton.cdiv(v, 1024),)](xc[r].contiguous(), state, out, v, pen_rows[r], rp, fr, pr,
                                                 BLOCK=1024, enable_fp_fusion=False)
        assert torch.equal(out, want[r]), f"row {r}: penalized logits differ from torch's"
    before = state.clone()
    host = torch.empty(b, dtype=torch.int64).pin_memory()
    got = S.sample_rows(xc, prm.pin_memory(), host_out=host, penalties=state)
    torch.cuda.synchronize()
    assert torch.equal(host, got.cpu())
    assert torch.equal(got, S.sample_rows(want, plain.pin_memory()))
    assert not torch.equal(got, S.sample_rows(xc, plain.pin_memory())), "the penalties changed no token"
    for r in (0, 4):
        assert int(got[r]) == int(want[r].argmax())
    _assert_counted(state, before, got, pen_rows)
    ref = S.reference_sample(want.cpu(), plain)
    assert int((ref != got.cpu()).sum()) <= 1  # fast exp/log may flip a near-tie
