"""The configurable pipeline: ``compile(model, passes=...)`` takes names with options or a ``Pipeline``; a user
pass registered with ``autodeploy.register_pass`` runs where it is inserted, with its options; unknown names and
bad options are ConfigErrors naming them (before any export); ``explain()`` shows the pipeline that ran; the
compile-cache key covers it."""

import pytest
import torch

import autodeploy
from autodeploy import ConfigError, PassResult, Pipeline, register_pass
from autodeploy.compiler.pipeline import DEFAULT_PASSES
from autodeploy.graph.utils import is_op
from autodeploy.metadata import SequenceChunk
from helpers import rel_rms
from model_zoo import make_model

KW = dict(max_batch_size=2, max_seq_len=64, page_size=4)
CALLS: list[dict] = []


@register_pass("test_count_ops")
def count_ops(gm, ctx, *, op: str = "linear", tag: str = "") -> PassResult:
    """Counts (and does not change) calls of ``aten.<op>``: a pass whose result depends on its option."""
    target = getattr(torch.ops.aten, op)
    n = sum(is_op(node, target) for node in gm.graph.nodes)
    CALLS.append({"op": op, "tag": tag, "backend": ctx.attention_backend})
    return PassResult(n, [f"{n} {op} calls"])


def _logits_match_hf(cm, model):
    prompt = [5, 9, 3, 77, 12, 40, 8]
    got = cm.forward(cm.pack([SequenceChunk(prompt, 0, [0, 1])], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0]
    return rel_rms(got, ref)


def test_pipeline_editing():
    p = Pipeline.default()
    assert p.names == DEFAULT_PASSES
    p.insert_after("insert_kv_cache", "test_count_ops", op="mm").insert_before("cleanup", ("test_count_ops", {}))
    p.remove("fuse_gemms").replace("match_rmsnorm", "match_rmsnorm")
    assert p.names[0] == "test_count_ops" and p.names[p.names.index("insert_kv_cache") + 1] == "test_count_ops"
    assert "fuse_gemms" not in p.names
    assert p.describe()[p.names.index("insert_kv_cache") + 1] == ["test_count_ops", {"op": "mm"}]
    with pytest.raises(ConfigError, match="'nope' is not in the pipeline"):
        p.insert_after("nope", "cleanup")
    with pytest.raises(ConfigError, match="pass name or a"):
        Pipeline([42])


def test_user_pass_runs_where_inserted_with_options():
    model = make_model("llama")
    CALLS.clear()
    pipe = Pipeline.default().insert_after("insert_kv_cache", "test_count_ops", op="linear", tag="after")
    pipe.insert_before("match_attention", ("test_count_ops", {"op": "scaled_dot_product_attention", "tag": "before"}))
    cm = autodeploy.compile(model, passes=pipe, **KW)
    assert [c["tag"] for c in CALLS] == ["before", "after"]
    assert CALLS[0]["backend"] is None and CALLS[1]["backend"] is not None  # ran before / after cache insertion
    names = [p.name for p in cm.report.passes]
    assert names[: len(pipe)] == pipe.names
    text = cm.explain()
    assert "options: op='linear', tag='after'" in text and "options: op='scaled_dot_product_attention', tag='before'" in text
    records = [p for p in cm.report.passes if p.name == "test_count_ops"]
    assert records[0].num_matches == 2 and records[1].num_matches > 0  # one SDPA call per layer
    assert _logits_match_hf(cm, model) < 1e-4
    assert "test_count_ops" in Pipeline.default().insert_after("cleanup", "test_count_ops").names


def test_list_form_and_removed_pass():
    model = make_model("llama")
    passes = [p for p in DEFAULT_PASSES if p != "fuse_gemms"] + [("test_count_ops", {"op": "linear"})]
    cm = autodeploy.compile(model, passes=passes, **KW)
    assert "fuse_gemms" not in [p.name for p in cm.report.passes]
    linears = sum(is_op(n, torch.ops.aten.linear.default) for n in cm.graph_module.graph.nodes)
    assert linears == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, unfused, and the LM head
    assert _logits_match_hf(cm, model) < 1e-4


@pytest.mark.parametrize("passes, match", [
    (["cleanup", "no_such_pass"], r"unknown passes \['no_such_pass'\]"),
    ([("test_count_ops", {"opp": "linear"})], r"pass 'test_count_ops' has no option 'opp'; its options: \['op', 'tag'\]"),
    ([("test_count_ops", {"op": 3})], r"pass 'test_count_ops' option 'op' must be str, got 3"),
    ([("cleanup", {"aggressive": True})], r"pass 'cleanup' has no option 'aggressive'; its options: none"),
    ("cleanup", r"passes must be a Pipeline or a list"),
    ([("cleanup", "x")], r"a pipeline entry is a pass name"),
])
def test_bad_pipelines_are_config_errors(passes, match, monkeypatch):
    import autodeploy.models as models

    def no_export(*a, **k):
        raise AssertionError("export ran before the pipeline was validated")

    monkeypatch.setattr(models, "export_model", no_export)
    with pytest.raises(ConfigError, match=match):
        autodeploy.compile(make_model("llama"), passes=passes, **KW)


def test_pipeline_without_cache_insertion_is_refused():
    with pytest.raises(ConfigError, match="never inserted the KV cache"):
        autodeploy.compile(make_model("llama"), passes=["cleanup"], **KW)


def test_cache_key_includes_the_pipeline(tmp_path):
    model = make_model("llama")
    a = autodeploy.compile(model, cache_dir=tmp_path, **KW)
    pipe = Pipeline.default().insert_after("cleanup", "test_count_ops", op="linear")
    b = autodeploy.compile(model, cache_dir=tmp_path, passes=pipe, **KW)
    c = autodeploy.compile(model, cache_dir=tmp_path,
                           passes=Pipeline.default().insert_after("cleanup", "test_count_ops", op="mm"), **KW)
    d = autodeploy.compile(model, cache_dir=tmp_path, passes=pipe, **KW)
    assert not a.report.cache_hit and not b.report.cache_hit and not c.report.cache_hit
    assert d.report.cache_hit
    assert "test_count_ops" in d.explain() and "options: op='linear'" in d.explain()  # the recorded pipeline
    assert _logits_match_hf(d, model) < 1e-4


def test_a_user_pass_cannot_silently_shadow_a_builtin():
    from autodeploy.compiler.pass_manager import import_pass

    import_pass("cleanup")
    with pytest.raises(ConfigError, match="pass 'cleanup' is already registered"):
        @register_pass("cleanup")
        def my_cleanup(gm, ctx) -> PassResult:
            return PassResult()
