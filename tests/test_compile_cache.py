"""Compile cache: a second compile of the same architecture skips export and passes, binds the new model's
weights, and gives the same results; different configs miss; a corrupt entry falls back to a full compile."""

import logging

import pytest

import autodeploy
from autodeploy import SamplingConfig
from model_zoo import make_model

CFG = SamplingConfig(max_new_tokens=8, ignore_eos=True)


def test_warm_compile_hits_and_rebinds_weights(tmp_path):
    kw = dict(max_batch_size=4, max_seq_len=64, page_size=4, cache_dir=tmp_path)
    cold = autodeploy.compile(make_model("qwen3", seed=1), **kw)
    assert not cold.report.cache_hit and "export" in cold.report.stage_seconds
    other_weights = make_model("qwen3", seed=2)
    warm = autodeploy.compile(other_weights, **kw)
    assert warm.report.cache_hit and "export" not in warm.report.stage_seconds
    fresh = autodeploy.compile(other_weights, max_batch_size=4, max_seq_len=64, page_size=4)
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    assert warm.generate(prompts, sampling=CFG) == fresh.generate(prompts, sampling=CFG)
    assert warm.generate(prompts, sampling=CFG) != cold.generate(prompts, sampling=CFG)  # weights differ


def test_different_config_misses(tmp_path):
    autodeploy.compile(make_model("llama"), max_batch_size=4, max_seq_len=64, cache_dir=tmp_path)
    cm = autodeploy.compile(make_model("llama", num_hidden_layers=3), max_batch_size=4, max_seq_len=64,
                            cache_dir=tmp_path)
    assert not cm.report.cache_hit
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_corrupt_entry_recompiles(tmp_path, caplog):
    autodeploy.compile(make_model("llama"), max_batch_size=4, max_seq_len=64, cache_dir=tmp_path)
    for f in tmp_path.glob("*.pt"):
        f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(make_model("llama"), max_batch_size=4, max_seq_len=64, cache_dir=tmp_path)
    assert not cm.report.cache_hit and "unusable" in caplog.text
    assert len(cm.generate([[1, 2]], sampling=CFG)[0]) == 8



@pytest.mark.parametrize("family", ["gemma3", "gpt2", "phi3"])
def test_cache_round_trip_across_families(tmp_path, family):
    impl_kw = dict(max_batch_size=2, max_seq_len=64, cache_dir=tmp_path)
    a = autodeploy.compile(make_model(family), **impl_kw)
    b = autodeploy.compile(make_model(family), **impl_kw)
    assert b.report.cache_hit
    assert a.generate([[1, 2, 3]], sampling=CFG) == b.generate([[1, 2, 3]], sampling=CFG)
