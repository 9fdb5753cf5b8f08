"""ONNX export of the compiled graph (torch.onnx dynamo exporter + onnxscript translations): the engine form
equals the cached graph in torch, the ONNX passes the checker, uses the opset-23 ops chosen for onnxruntime's
CPU EP, and onnxruntime reproduces the torch engine graph; what has no translation is refused by name."""

import numpy as np
import onnx
import pytest
import torch

import autodeploy
from autodeploy.backends import AttentionSpec, get_backend
from autodeploy.backends.onnxruntime import translations
from autodeploy.backends.onnxruntime.export import engine_graph, export_onnx
from autodeploy.backends.onnxruntime.lowering import example_step
from autodeploy.errors import UnsupportedModelError
from autodeploy.metadata import SequenceChunk
from model_zoo import make_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Gemma-2 (sliding window + softcap) graph on the torch backend, its engine form and its ONNX."""
    model = make_model("gemma2", "eager")
    cm = autodeploy.compile(model, max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    eg = engine_graph(cm.graph_module)
    path = export_onnx(eg, example_step(cm), tmp_path_factory.mktemp("onnx") / "model.onnx")
    return cm, eg, path


def _step(cm):
    """A mixed step over pages already holding a cached prefix: an extend, a decode and a fresh prefill."""
    prefix = cm.pack([SequenceChunk(list(range(1, 8)), 0, [1, 2]), SequenceChunk(list(range(3, 9)), 0, [3, 4])])
    cm.forward(prefix)
    return cm.pack([SequenceChunk([9, 10, 11], 7, [1, 2, 5]), SequenceChunk([12], 6, [3, 4]),
                    SequenceChunk([5, 6, 7, 8, 9, 10], 0, [6, 7])], all_logits=True)


def test_engine_graph_matches_cached_graph(exported):
    cm, eg, _ = exported
    batch = _step(cm)
    caches = {n: t.clone() for n, t in cm.caches.items()}
    with torch.no_grad():
        engine_out = eg.module(**batch.inputs, **caches)
        ref = cm.graph_module(**batch.inputs, **{n: t.clone() for n, t in cm.caches.items()})[0]
    assert torch.equal(torch.cat([c.flatten() for c in caches.values()]),
                       torch.cat([c.flatten() for c in cm.caches.values()])), "the engine form wrote the cache"
    torch.testing.assert_close(engine_out[0], ref, rtol=1e-5, atol=1e-5)
    assert len(engine_out) == 1 + len(cm.caches)  # logits, then each cache's new rows


def test_onnx_checks_and_uses_opset23_ops(exported):
    _, _, path = exported
    onnx.checker.check_model(str(path))  # the path form (works past 2 GB)
    model = onnx.load(str(path), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "RMSNormalization"} <= ops
    assert (path.parent / (path.name + ".data")).is_file()  # weights are external


def test_onnxruntime_reproduces_engine_graph(exported):
    import onnxruntime as ort

    cm, eg, path = exported
    batch = _step(cm)
    feeds = dict(batch.inputs, **cm.caches)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})
    with torch.no_grad():
        want = eg.module(**feeds)
    assert [o.name for o in session.get_outputs()] == eg.output_names
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_metadata_field_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="decode_work"):
        translations.prepare_metadata(None, None, None, None, None, "seq_idx,decode_work:window=4")


def test_variants_without_onnx_form_are_refused():
    backend = get_backend("onnxruntime")
    spec = dict(layer=0, num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, causal=True, dtype=torch.float32)
    assert backend.supports(AttentionSpec(**spec, params={"sliding_window": 4, "logit_softcap": 5.0}))[0]
    ok, why = backend.supports(AttentionSpec(**spec, params={"sinks": True}))
    assert not ok and "sinks" in why


def test_rms_norm_with_mixed_dtypes_uses_the_decomposition(tmp_path):
    """fp16 activations with an fp32 weight: ONNX RMSNormalization wants one dtype, so the decomposition runs,
    with the canonical op's numerics (normalise in fp32, cast to the input dtype, then scale)."""
    import onnxruntime as ort

    from autodeploy.backends.onnxruntime.translations import translation_table

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.ops.autodeploy.rms_norm(x, self.w, 1e-6)

    module, x = Norm().eval(), torch.randn(3, 8).half()
    program = torch.onnx.export(module, (x,), dynamo=True, opset_version=23, verbose=False,
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "norm.onnx"))
    assert "RMSNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "norm.onnx")).graph.node}
    session = ort.InferenceSession(str(tmp_path / "norm.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_array_equal(got, module(x).detach().numpy())


def test_ops_without_translation_are_refused_before_export(exported, tmp_path):
    cm, _, _ = exported
    eg = engine_graph(cm.graph_module)  # a fresh copy
    rope = next(n for n in eg.module.graph.nodes if n.target is torch.ops.autodeploy.rope.default)
    rope.target = torch.ops.autodeploy.attention.default  # stands for any op the exporter cannot translate
    with pytest.raises(UnsupportedModelError, match="autodeploy.attention.default.*no ONNX translation"):
        export_onnx(eg, example_step(cm), tmp_path / "model.onnx")
