"""Admission batching under load (AdmissionPolicy): while the batch is nearly full, waiting requests start together
once enough prompt tokens are ready, never later than ``max_wait_steps`` steps, and outputs do not change."""

import pytest

import autodeploy
from autodeploy import AdmissionPolicy, SamplingConfig
from autodeploy.runtime.engine import Engine
from model_zoo import make_model


@pytest.fixture(scope="module")
def cm():
    return autodeploy.compile(make_model("llama", seed=11), max_batch_size=4, max_seq_len=96, page_size=4,
                              max_num_tokens=64)


def _greedy(n):
    return SamplingConfig(max_new_tokens=n, ignore_eos=True)


# four running requests finishing at different steps, then two waiting 8-token prompts
_PROMPTS = [[3 + i, 7, 11 + i, 2, 5, 9, 1, 4] for i in range(6)]
_LENGTHS = [4, 9, 30, 30, 6, 6]


def _run(cm, policy, async_scheduling):
    """Drive the engine; per request, the step at which its prompt was first scheduled."""
    engine = Engine(cm, admission=policy, async_scheduling=async_scheduling)
    reqs = [engine.add_request(p, _greedy(n)) for p, n in zip(_PROMPTS, _LENGTHS)]
    started: dict[int, int] = {}
    step = 0
    while engine.has_work():
        engine.step()
        step += 1
        for i, r in enumerate(reqs):
            if i not in started and any(s.num_computed > 0 for s in r.seqs):
                started[i] = step
        assert step < 500, "engine does not make progress"
    return [engine.output(r).output_ids for r in reqs], started, engine.scheduler.total_held_steps


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_waiting_requests_start_together_once_enough_tokens(cm, async_scheduling):
    """With three of four slots busy, the first waiting 8-token prompt is held (8 < 16 tokens); when a second
    slot frees, both start in the same step. Outputs equal greedy admission's."""
    policy = AdmissionPolicy(min_tokens=16, max_wait_steps=100, busy_fraction=0.5)
    outs, started, held = _run(cm, policy, async_scheduling)
    want, greedy_started, greedy_held = _run(cm, AdmissionPolicy(min_tokens=0), async_scheduling)
    assert outs == want
    assert greedy_held == 0 and greedy_started[4] < greedy_started[5]  # one at a time without the policy
    assert held > 0 and started[4] == started[5]
    assert started[4] > greedy_started[4]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_admission_hold_is_bounded(cm, async_scheduling):
    """A threshold that can never be met delays a waiting request by at most ``max_wait_steps`` steps."""
    greedy_outs, greedy_started, _ = _run(cm, AdmissionPolicy(min_tokens=0), async_scheduling)
    outs, started, held = _run(cm, AdmissionPolicy(min_tokens=10**6, max_wait_steps=3, busy_fraction=0.5),
                               async_scheduling)
    assert outs == greedy_outs
    assert 0 < held and started[4] - greedy_started[4] <= 3 + 1  # +1: an in-flight step completes first


def test_no_hold_at_low_load(cm):
    """Below ``busy_fraction`` of the batch, a new request starts at once (latency first)."""
    engine = Engine(cm, admission=AdmissionPolicy(min_tokens=10**6, busy_fraction=0.875))
    first = engine.add_request(_PROMPTS[0], _greedy(20))
    engine.step()
    second = engine.add_request(_PROMPTS[1], _greedy(4))
    engine.step()
    assert first.seqs[0].num_computed > 0 and second.seqs[0].num_computed > 0
    assert engine.scheduler.total_held_steps == 0
    # an idle engine never holds, whatever the policy says
    idle = Engine(cm, admission=AdmissionPolicy(min_tokens=10**6, busy_fraction=0.0))
    alone = idle.add_request(_PROMPTS[2], _greedy(2))
    idle.step()
    assert alone.seqs[0].num_computed > 0 and idle.scheduler.total_held_steps == 0


def test_policy_validation():
    for bad in (dict(min_tokens=-1), dict(max_wait_steps=-2), dict(busy_fraction=1.5)):
        with pytest.raises(autodeploy.ConfigError, match="invalid admission policy"):
            AdmissionPolicy(**bad)


def test_cli_rejects_bad_policy_with_a_clear_error(capsys):
    """The CLI names the bad setting (exit code 2, no stack trace)."""
    from autodeploy.entrypoints.cli import main

    assert main(["bench", "--num-requests", "1", "--admit-min-tokens", "-1"]) == 2
    assert "invalid admission policy" in capsys.readouterr().err
