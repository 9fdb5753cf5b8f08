"""The out-of-tree backend plugin (examples/backend_plugin, a separate pip package; CI installs it): found
through the ``autodeploy.backends`` entry point, it compiles models that match HF on a mixed batch and in
greedy decoding, ``explain()`` names it, ``autodeploy backends`` lists it with its capabilities, a broken plugin
is a warning, and the compile cache keys on plugin code."""

import json
import logging
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch

import autodeploy
from autodeploy.backends import get_backend, list_backends, register_backend, registry
from autodeploy.compiler import compile_cache
from autodeploy.metadata import SequenceChunk
from helpers import hf_greedy, rel_rms
from model_zoo import make_model

PLUGIN = "sdpa-example"
KW = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)


@pytest.fixture(autouse=True, scope="module")
def _installed():
    if not any(ep.name == PLUGIN for ep in entry_points(group="autodeploy.backends")):
        pytest.fail("the example plugin is not installed: pip install --no-deps -e examples/backend_plugin")


def test_plugin_is_discovered():
    assert PLUGIN in list_backends()
    backend = get_backend(PLUGIN)
    assert type(backend).__module__ == "autodeploy_sdpa_example"
    info = backend.describe()
    assert info["cuda_graphs"] == "none" and info["metadata_fields"] == []


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_plugin_matches_hf_on_a_mixed_batch(family):
    model = make_model(family)
    cm = autodeploy.compile(model, backend=PLUGIN, **KW)
    assert any(getattr(n.target, "__name__", "").startswith("sdpa_example_cached_attention")
               for n in cm.graph_module.graph.nodes)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    pages = {0: [10, 3, 4], 1: [5, 6, 7, 20], 2: [30, 31]}
    cm.forward(cm.pack([SequenceChunk(seqs[0][:8], 0, pages[0]), SequenceChunk(seqs[1][:5], 0, pages[1])]))
    # one step: an extend (8 new tokens after 5 cached), a fresh prefill (7) and a decode (1 after 8 cached)
    step = [SequenceChunk(seqs[0][8:9], 8, pages[0]), SequenceChunk(seqs[1][5:], 5, pages[1]),
            SequenceChunk(seqs[2], 0, pages[2])]
    batch = cm.pack(step, all_logits=True)
    assert batch.num_prefill == 2 and batch.num_decode == 1
    got = cm.forward(batch)
    with torch.no_grad():
        ref = [model(torch.tensor([s])).logits[0] for s in seqs]
    want = {0: ref[0][8:9], 1: ref[1][5:], 2: ref[2]}
    rows = torch.tensor(batch.logits_rows)
    for chunk_index, expected in want.items():
        assert rel_rms(got[rows == chunk_index], expected) < 1e-4


def test_plugin_greedy_matches_hf_and_is_explained():
    model = make_model("llama", seed=4)
    cm = autodeploy.compile(model, backend=PLUGIN, **KW)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    outs = cm.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert outs == [hf_greedy(model, p, 12) for p in prompts]
    assert f"backend: {PLUGIN} (requested by the user)" in cm.explain()


def test_plugin_refuses_what_it_lacks():
    with pytest.raises(autodeploy.UnsupportedModelError, match="sdpa-example.*logit_softcap"):
        autodeploy.compile(make_model("gemma2", "eager"), backend=PLUGIN, **KW)


def test_backends_command_lists_capabilities():
    cli = "from autodeploy.entrypoints.cli import main; raise SystemExit(main(['backends', '--json']))"
    out = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, check=True).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"torch", "triton", PLUGIN} <= set(rows)
    plugin = rows[PLUGIN]
    for key in ("devices", "dtypes", "params", "metadata_fields", "cuda_graphs", "cache_layout"):
        assert key in plugin, key
    assert plugin["params"] == ["sliding_window"] and plugin["cuda_graphs"] == "none"
    assert rows["triton"]["cuda_graphs"] == "whole_step"
    assert "fuse_add_rmsnorm" in rows["triton"]["model_passes"]


def _fake_distribution(root, name, entry):
    """A minimal installed distribution on ``root`` exposing one ``autodeploy.backends`` entry point."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[autodeploy.backends]\n{name} = {entry}\n")


def test_broken_plugin_warns_and_core_still_works(tmp_path, monkeypatch, caplog):
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('this plugin is broken')\n")
    (tmp_path / "not_a_backend_mod.py").write_text("def make():\n    return 42\n")
    _fake_distribution(tmp_path, "broken-one", "broken_plugin_mod:Backend")
    _fake_distribution(tmp_path, "wrong-one", "not_a_backend_mod:make")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        names = list_backends()
    assert "backend plugin broken-one (broken_plugin_mod:Backend) failed to load" in caplog.text
    assert "this plugin is broken" in caplog.text
    assert "wrong-one" in caplog.text and "not an AttentionBackend" in caplog.text
    assert {"torch", PLUGIN} <= set(names) and "broken-one" not in names
    model = make_model("llama")
    assert autodeploy.compile(model, **KW).generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True) == \
        [hf_greedy(model, [1, 2, 3], 4)]


def test_cache_key_covers_plugin_code(tmp_path, monkeypatch):
    """A plugin backend defined in its own file: editing that file invalidates the compile-cache entry."""
    src = tmp_path / "my_plugin_backend.py"
    src.write_text(textwrap.dedent("""
        from autodeploy.backends.torch import TorchBackend

        class MyBackend(TorchBackend):
            name = "my-plugin"
            priority = -50
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_plugin_backend

    register_backend(my_plugin_backend.MyBackend())
    model = make_model("llama")
    kw = dict(KW, backend="my-plugin", cache_dir=tmp_path / "cache")
    assert not autodeploy.compile(model, **kw).report.cache_hit
    assert autodeploy.compile(model, **kw).report.cache_hit
    src.write_text(src.read_text() + "\n# a change in the plugin's code\n")
    monkeypatch.setattr(compile_cache, "_PACKAGE_HASHES", {})  # a new process would hash afresh
    cm = autodeploy.compile(model, **kw)
    assert not cm.report.cache_hit
    assert cm.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True) == [hf_greedy(model, [1, 2, 3], 4)]


@pytest.mark.gpu
def test_plugin_on_cuda_runs_uncaptured_and_matches_hf():
    """Its CUDA-graph grade is none: the cudagraph lowering falls back to eager and says why."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = make_model("mistral").cuda()
    cm = autodeploy.compile(model, backend=PLUGIN, max_batch_size=4, max_seq_len=128)
    assert cm.report.lowering == "eager" and "supports no CUDA graphs" in cm.report.lowering_reason
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    gen = model.generation_config
    saved, gen.eos_token_id = gen.eos_token_id, None
    try:
        want = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    finally:
        gen.eos_token_id = saved
    assert cm.generate([prompt], max_new_tokens=12, ignore_eos=True) == [want]
