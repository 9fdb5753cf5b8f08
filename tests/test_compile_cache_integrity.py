"""Compile-cache integrity: a damaged entry (flipped tensor bytes, edited JSON) is detected by its content hash
and recompiled with a warning; an unwritable cache directory is a warning and the compile goes on uncached; a
planted pickle never runs; two processes writing one entry at once leave a valid entry. After each, a normal
compile answers like HF."""

import json
import logging
import multiprocessing
import os
import pickle
import struct

import pytest
import torch

import autodeploy
from autodeploy.compiler import compile_cache
from helpers import rel_rms
from model_zoo import make_model

KW = dict(max_batch_size=2, max_seq_len=64, page_size=4)
PROMPT = [3, 17, 42, 5, 99, 7]


def _check_matches_hf(cm, model):
    """All-token logits of one prompt against HF eager (fp32 tier)."""
    from autodeploy.metadata import SequenceChunk

    got = cm.forward(cm.pack([SequenceChunk(PROMPT, 0, [0, 1])], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0]
    assert rel_rms(got, ref) < 1e-4


def _entry(tmp_path):
    (entry,) = tmp_path.glob(f"*{compile_cache.SUFFIX}")
    return entry


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data, n, json.loads(data[8:8 + n])


def _cold(tmp_path, family="llama"):
    model = make_model(family)
    cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not cm.report.cache_hit
    return model, _entry(tmp_path)


def test_entry_is_safetensors_with_a_content_hash(tmp_path):
    _model, entry = _cold(tmp_path)
    data, n, header = _header(entry)
    meta = header["__metadata__"]
    assert set(meta) == {"autodeploy", "sha256"}
    assert json.loads(meta["autodeploy"])["format"] == compile_cache.FORMAT_VERSION
    stored = [k for k in header if k != "__metadata__"]
    assert stored, "the RoPE table is a graph-only constant and is stored"
    assert not any(k.startswith("m.") for k in stored)  # no model weight is stored
    assert data[:2] != b"\x80\x04" and b"PK" not in data[:4]  # neither a pickle nor a torch zip


def test_flipped_tensor_bytes_recompile(tmp_path, caplog):
    model, entry = _cold(tmp_path)
    data, n, header = _header(entry)
    name, info = next((k, v) for k, v in header.items() if k != "__metadata__")
    lo = 8 + n + info["data_offsets"][0]
    buf = bytearray(data)
    buf[lo + 5] ^= 0x40  # one float of the stored tensor changes value
    entry.write_bytes(bytes(buf))
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not cm.report.cache_hit
    assert "content hash mismatch" in caplog.text
    _check_matches_hf(cm, model)
    assert autodeploy.compile(model, cache_dir=tmp_path, **KW).report.cache_hit  # rewritten, valid again


def test_edited_json_recompiles(tmp_path, caplog):
    model, entry = _cold(tmp_path)
    data, n, header = _header(entry)
    # Change one digit inside the stored structure: still valid JSON of the same length, different content.
    text = data[8:8 + n].decode()
    at = text.index('\\"page_size\\": ') + len('\\"page_size\\": ')
    digit = text[at]
    edited = text[:at] + ("5" if digit != "5" else "6") + text[at + 1:]
    entry.write_bytes(data[:8] + edited.encode() + data[8 + n:])
    json.loads(edited)  # the header still parses: only the hash can catch this
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not cm.report.cache_hit and "content hash mismatch" in caplog.text
    _check_matches_hf(cm, model)


def test_truncated_entry_recompiles(tmp_path, caplog):
    model, entry = _cold(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not cm.report.cache_hit and "unusable" in caplog.text
    _check_matches_hf(cm, model)


def test_unwritable_directory_warns_and_compiles_uncached(tmp_path, caplog, monkeypatch):
    model = make_model("llama")

    def deny(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(compile_cache.os, "replace", deny)  # root ignores chmod: fail the write itself
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert "continuing uncached" in caplog.text and "Permission denied" in caplog.text
    assert not list(tmp_path.iterdir()), "the temp file is removed"
    _check_matches_hf(cm, model)


def test_cache_dir_under_a_regular_file_warns(tmp_path, caplog):
    model = make_model("llama")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=blocker / "cache", **KW)
    assert "continuing uncached" in caplog.text
    _check_matches_hf(cm, model)


class _Plant:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_planted_pickle_does_not_run(tmp_path, caplog):
    model, entry = _cold(tmp_path)
    marker = tmp_path / "PWNED"
    entry.write_bytes(pickle.dumps(_Plant(str(marker))))
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not marker.exists(), "loading a cache entry executed code"
    assert not cm.report.cache_hit and "unusable" in caplog.text
    _check_matches_hf(cm, model)


def test_entry_naming_a_disallowed_callable_is_refused(tmp_path, caplog):
    """The JSON names call targets; one outside the allow-list (os.system) is refused, never imported or run."""
    model, entry = _cold(tmp_path)
    data, n, header = _header(entry)
    meta = header["__metadata__"]
    state = json.loads(meta["autodeploy"])
    node = next(nd for nd in state["nodes"] if nd[2][0] == "py")
    node[2] = ["py", "os", "system"]
    structure = json.dumps(state, sort_keys=True)
    from safetensors.torch import load_file, save

    tensors = load_file(str(entry))
    forged = save(tensors, metadata={"autodeploy": structure,
                                     "sha256": compile_cache._content_hash(structure, tensors)})  # hash forged too
    entry.write_bytes(forged)
    with caplog.at_level(logging.WARNING, logger="autodeploy"):
        cm = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    assert not cm.report.cache_hit and "outside the allow-list" in caplog.text
    _check_matches_hf(cm, model)


# The key covers the code of every backend "auto" could pick; the test session registers extra ones, which the
# child processes lack, so the processes pin the backend and the kernel providers.
_PINNED = dict(backend="torch", kernels=[])


def _compile_into(cache_dir, seed):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from model_zoo import make_model as mk

    import autodeploy as ad

    ad.compile(mk("llama", seed=seed), cache_dir=cache_dir, **KW, **_PINNED)


def test_concurrent_writers_leave_a_valid_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_SOURCE_HASH", None)  # hash the sources now, as the children do
    before = compile_cache._source_hash()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_compile_into, args=(str(tmp_path), s)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    monkeypatch.setattr(compile_cache, "_SOURCE_HASH", None)
    unchanged = compile_cache._source_hash() == before  # a source edit meanwhile would change the key
    entries = list(tmp_path.glob(f"*{compile_cache.SUFFIX}"))
    assert len(entries) == 1 or not unchanged
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    model = make_model("llama", seed=3)
    for entry in entries:
        compile_cache.read_entry(entry)  # parses and its hash verifies
        assert compile_cache.load(entry, model) is not None  # and binds to a model
    cm = autodeploy.compile(model, cache_dir=tmp_path, **KW, **_PINNED)
    assert bool(cm.report.cache_hit) or not unchanged
    _check_matches_hf(cm, model)
