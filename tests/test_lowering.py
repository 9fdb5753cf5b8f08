"""Lowering modes on CPU: torch-compile (inductor) gives the eager graph's greedy tokens; cudagraph falls back
with a clear log line and reason where there is no GPU."""

import logging

import pytest

import autodeploy
from autodeploy.runtime.sampling import SamplingConfig
from model_zoo import make_model


@pytest.mark.parametrize("mode", ["cudagraph", "cudagraph-piecewise", "cudagraph-decode", "torch-compile+cudagraph"])
def test_cudagraph_falls_back_on_cpu(caplog, mode):
    model = make_model("llama")
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=32, lowering=mode)
    assert f"{mode} lowering needs a CUDA device" in caplog.text
    assert cm.report.lowering == "eager" and "fell back" in cm.report.lowering_reason
    assert cm.graph_runner is None and cm.mixed_graphs is None and cm.piecewise is None
    assert cm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0].__len__() == 4


def test_unknown_lowering_is_rejected():
    with pytest.raises(autodeploy.BackendUnavailableError, match="unknown lowering"):
        autodeploy.compile(make_model("llama"), max_batch_size=2, max_seq_len=32, lowering="magic")


def test_torch_compile_matches_eager_greedy():
    model = make_model("llama", seed=2)
    eager = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4)
    comp = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, lowering="torch-compile")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [4]]
    cfg = SamplingConfig(max_new_tokens=16, ignore_eos=True)
    assert comp.generate(prompts, sampling=cfg) == eager.generate(prompts, sampling=cfg)
    assert comp.report.lowering == "torch-compile"


def test_warmup_touches_only_the_scratch_page():
    model = make_model("llama", seed=3)
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=32, page_size=4)
    assert "warmup" not in cm.report.stage_seconds  # compile warms up on GPUs only
    prompts, cfg = [[5, 6, 7, 8, 9, 10]], SamplingConfig(max_new_tokens=6, ignore_eos=True)
    before = cm.generate(prompts, sampling=cfg)
    snapshot = {name: c.clone() for name, c in cm.caches.items()}
    assert cm.warmup() >= 0
    for name, cache in cm.caches.items():
        changed = (cache != snapshot[name]).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == [cm.scratch_page], (name, changed)
    assert cm.generate(prompts, sampling=cfg) == before
