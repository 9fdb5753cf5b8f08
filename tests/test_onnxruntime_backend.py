"""The onnxruntime backend end to end: ``compile(model, backend="onnxruntime")`` runs every step through one
InferenceSession inside the usual runtime. Per family: mixed-batch logits within 1e-4 relative RMS of HF eager
and greedy tokens identical to HF generate. Plus the engine cache (a second compile skips the export and says
so in ``explain()``), the lowering contract, and the choice of backend on a CPU."""

import zlib

import pytest
import torch

import autodeploy
from autodeploy.backends import get_backend
from autodeploy.backends.onnxruntime import engine_files, export, lowering
from autodeploy.errors import BackendUnavailableError
from autodeploy.lowering import resolve_lowering
from autodeploy.runtime.sampling import SamplingConfig
from helpers import assert_mixed_batch_matches_hf, hf_greedy
from model_zoo import make_model

FAMILIES = {"llama": "sdpa", "qwen3": "sdpa", "gemma2": "eager", "gpt2": "sdpa"}
OPTIONS = dict(backend="onnxruntime", max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("engines")
    mp.setenv("AUTODEPLOY_ENGINE_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def compiled(engine_cache):
    built = {}

    def get(family):
        if family not in built:
            model = make_model(family, FAMILIES[family], seed=3)
            built[family] = (model, autodeploy.compile(model, **OPTIONS))
        return built[family]

    return get


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_batch_logits_and_greedy_tokens_match_hf(compiled, family):
    model, cm = compiled(family)
    assert cm.report.lowering == "onnxruntime"
    g = torch.Generator().manual_seed(zlib.crc32(family.encode()) % 1000)  # str hash() differs per process
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    assert_mixed_batch_matches_hf(cm, model, seqs, family)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 11, 1)]
    outs = cm.generate(prompts, sampling=SamplingConfig(max_new_tokens=16, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == hf_greedy(model, p, 16), f"{family}: prompt of {len(p)} tokens diverged"


def test_second_compile_hits_the_engine_cache(compiled, engine_cache):
    model, first = compiled("llama")
    exports = export.EXPORT_CALLS
    again = autodeploy.compile(model, **OPTIONS)
    assert export.EXPORT_CALLS == exports, "the second compile exported again"
    assert "engine cache hit" in again.explain()
    assert again._runner.engine_dir == first._runner.engine_dir
    prompt = [[3, 1, 4, 1, 5]]
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    assert again.generate(prompt, sampling=sampling) == first.generate(prompt, sampling=sampling)


def test_engine_key_covers_the_weights(compiled):
    """Same architecture, other weights: another engine (the weights live inside it)."""
    _, cm = compiled("llama")
    example = {n: t for n, t in lowering.example_step(cm).items()}
    eg = export.engine_graph(cm.graph_module)
    key = engine_files.graph_key(eg.module, example, {})
    target = next(n.target for n in eg.module.graph.nodes if n.op == "get_attr")
    owner, _, name = target.rpartition(".")
    module = eg.module.get_submodule(owner) if owner else eg.module
    setattr(module, name, torch.nn.Parameter(getattr(module, name).detach() + 1e-3, requires_grad=False))
    assert engine_files.graph_key(eg.module, example, {}) != key
    assert engine_files.graph_key(export.engine_graph(cm.graph_module).module, example, {}) == key


def test_corrupt_cache_entry_is_not_used(compiled, engine_cache):
    _, cm = compiled("llama")
    entry = cm._runner.engine_dir
    key = entry.name
    assert engine_files.lookup(engine_cache, key) == entry
    data = entry / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    assert engine_files.lookup(engine_cache, key) is None


def test_engine_backends_own_their_lowering():
    backend = get_backend("onnxruntime")
    cpu = torch.device("cpu")
    assert resolve_lowering("auto", cpu, backend) == "onnxruntime"
    with pytest.raises(BackendUnavailableError, match="lowers the whole graph"):
        resolve_lowering("cudagraph", cpu, backend)


def test_auto_keeps_torch_on_cpu():
    torch_backend, ort_backend = get_backend("torch"), get_backend("onnxruntime")
    assert ort_backend.available(torch.device("cpu"), explicit=False)[0]
    assert ort_backend.priority < torch_backend.priority


def test_chunked_prefill_and_steps_without_logits_rows(compiled):
    """A prompt longer than the token budget is prefilled in chunks; a step of non-final chunks has no logits
    rows at all (an empty engine output)."""
    from autodeploy.metadata import SequenceChunk
    from autodeploy.runtime.engine import Engine

    model, cm = compiled("llama")
    empty = cm.forward(cm.pack([SequenceChunk([1, 2, 3], 0, [1], want_logits=False)]))
    assert empty.shape == (0, 128)
    prompt = list(range(1, 22))
    out = Engine(cm, max_num_tokens=8).generate([prompt], SamplingConfig(max_new_tokens=8, ignore_eos=True))
    assert out[0].output_ids == hf_greedy(model, prompt, 8)
