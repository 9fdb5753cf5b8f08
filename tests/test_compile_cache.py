"""Compile cache: a second compile of the same architecture skips export and passes, binds the new model's
weights, and gives the same results; different configs miss; a corrupt entry falls back to a full compile."""

import logging
import os
import subprocess
import sys

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
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_corrupt_entry_recompiles(tmp_path, caplog):
    autodeploy.compile(make_model("llama"), max_batch_size=4, max_seq_len=64, cache_dir=tmp_path)
    for f in tmp_path.glob("*.safetensors"):
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


def test_kernels_option_is_part_of_the_key(tmp_path):
    kw = dict(max_batch_size=2, max_seq_len=64, cache_dir=tmp_path)
    autodeploy.compile(make_model("llama"), **kw)
    assert not autodeploy.compile(make_model("llama"), kernels=[], **kw).report.cache_hit
    assert autodeploy.compile(make_model("llama"), kernels=[], **kw).report.cache_hit


_WARM = """
import sys; sys.path.insert(0, {tests!r})
import autodeploy
from autodeploy.compiler import compile_cache
from model_zoo import make_model
cm = autodeploy.compile(make_model("llama"), backend="torch", kernels=["triton"], max_batch_size=2, max_seq_len=64,
                        cache_dir={cache!r})
print("HIT" if cm.report.cache_hit else "MISS", compile_cache._source_hash(),
      cm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)[0])
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")
def test_kernel_provider_ops_load_in_a_fresh_process(tmp_path):
    """An entry compiled with torch attention and triton kernels holds triton ops that nothing else imports:
    the entry records their modules, so a new process loads it (instead of recompiling every time)."""
    code = _WARM.format(tests=os.path.dirname(__file__), cache=str(tmp_path))
    run = lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                 check=True, env={**os.environ, "TRITON_INTERPRET": "1"}).stdout.split(maxsplit=2)
    cold, warm = run(), run()
    assert cold[0] == "MISS"
    assert warm[0] == "HIT" or warm[1] != cold[1]  # (unless a source edit in between changed the key)
    assert warm[2] == cold[2]


def test_explain_says_why_kernels_ran_or_not(tmp_path):
    kw = dict(max_batch_size=2, max_seq_len=64, cache_dir=tmp_path)
    cold = autodeploy.compile(make_model("llama"), **kw)
    assert "kernels from triton skipped: needs a CUDA device" in cold.explain()
    warm = autodeploy.compile(make_model("llama"), **kw)
    assert warm.report.cache_hit and warm.report.kernels == cold.report.kernels
