"""Engines on disk: ``cm.save(dir)`` writes ONNX + external weights + runtime config + tokenizer + a sha256
manifest; ``autodeploy.load(dir)`` runs it in a fresh process that never builds an HF model and generates the
same tokens. Corrupt or tampered files are refused before anything is read."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import autodeploy
from autodeploy.backends.onnxruntime.engine_files import EngineIntegrityError
from autodeploy.errors import ConfigError
from autodeploy.runtime.sampling import SamplingConfig
from model_zoo import make_model

PROMPTS = [[5, 9, 2, 7, 1, 3], [11, 4], [8]]
SAMPLING = dict(max_new_tokens=12, ignore_eos=True)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Qwen3 compiled on the default (torch) backend, saved: ``save`` exports the engine form."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTODEPLOY_ENGINE_CACHE", "0")
    model = make_model("qwen3", "sdpa", seed=5)
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=40)
    cm.info.tokenizer = _tiny_tokenizer()
    directory = cm.save(tmp_path_factory.mktemp("engine") / "qwen3")
    mp.undo()
    return cm, directory


def test_engine_directory_is_self_contained(saved):
    cm, directory = saved
    names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert {"model.onnx", "model.onnx.data", "engine.json", "config.json", "manifest.json"} <= names
    assert any(n.startswith("tokenizer/") for n in names)
    config = json.loads((directory / "config.json").read_text())
    assert config["backend"] == "onnxruntime" and config["dtype"] == "torch.float32"
    assert (config["max_batch_size"], config["max_seq_len"], config["page_size"]) == (4, 64, 4)
    assert config["vocab_size"] == 128 and config["eos_token_ids"] == list(cm.info.eos_token_ids)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}


def test_fresh_process_loads_without_hf_model_and_generates_the_same(saved):
    cm, directory = saved
    want = cm.generate(PROMPTS, sampling=SamplingConfig(**SAMPLING))
    script = textwrap.dedent(f"""
        import json, sys
        import transformers
        built = []
        transformers.PreTrainedModel.__init__ = lambda self, *a, **k: built.append(type(self).__name__)
        import autodeploy
        from autodeploy.runtime.sampling import SamplingConfig
        cm = autodeploy.load({str(directory)!r})
        out = cm.generate({PROMPTS!r}, sampling=SamplingConfig(**{SAMPLING!r}))
        modeling = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m
                          and not m.startswith("transformers.models.auto."))  # the auto registry, no model
        print(json.dumps({{"out": out, "built": built, "modeling": modeling, "lowering": cm.report.lowering,
                          "tokens": cm.info.tokenizer("w3 w7")["input_ids"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"AUTODEPLOY_ENGINE_CACHE": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["built"] == [] and result["modeling"] == []
    assert result["lowering"] == "onnxruntime"
    assert result["out"] == want
    assert result["tokens"] == [3, 7]


def _copy(directory, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(directory, dst)
    return dst


def test_corrupt_weights_are_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    data = dst / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(EngineIntegrityError, match="model.onnx.data"):
        autodeploy.load(dst)


def test_missing_file_and_missing_manifest_are_refused(saved, tmp_path):
    dst = _copy(saved[1], tmp_path)
    (dst / "engine.json").unlink()
    with pytest.raises(EngineIntegrityError, match="engine.json"):
        autodeploy.load(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(EngineIntegrityError, match="manifest"):
        autodeploy.load(dst)


def test_save_refuses_a_non_empty_directory(saved, tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        saved[0].save(tmp_path)
