"""Tensor-parallel shard loading (models/shard_loading.py), in one process: a rank that builds the model on
deferred weights, exports it, runs the passes and then reads its slices from the checkpoint ends with exactly
the tensors of the old path (whole model loaded, then sliced), having read about half of the checkpoint and no
sharded tensor whole. Refusals name the tensor. The 2-process runs are in test_tensor_parallel.py."""

from __future__ import annotations

import os

import pytest
import torch

from autodeploy.compiler import compile_cache
from autodeploy.compiler.context import CompileContext
from autodeploy.compiler.pass_manager import PassManager
from autodeploy.compiler.pipeline import Pipeline
from autodeploy.compiler.report import CompileReport
from autodeploy.graph.probe_weights import is_deferred, probe_weights
from autodeploy.graph.utils import getattr_path
from autodeploy.models import export_model, load_model, shard_loading
from autodeploy.passes.quantize_linears import resolve_quantization
from model_zoo import COMMON, make_model

import autodeploy.compiler.driver  # noqa: F401  (registers the MoE and quantization recipes)


def _mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                               **kw})).eval()


def _saved(tmp_path, model) -> str:
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def _passes(gm, rank: int, world: int = 2, quantization=None):
    """The default pipeline as rank ``rank`` would run it, minus the token-mixing probe (its forward meets the
    other ranks in collectives; the 2-process tests run it)."""
    quant = resolve_quantization(quantization, None, torch.device("cpu")) if quantization else None
    ctx = CompileContext(max_batch_size=4, max_seq_len=64, max_num_tokens=128, page_size=0,
                         device=torch.device("cpu"), dtype=torch.float32, backend="torch", report=CompileReport(),
                         quantization=quant)
    pipeline = Pipeline.default().remove("check_sequence_mixers")
    pipeline.insert_before("insert_kv_cache", ("shard_tensor_parallel", {
        "world_size": world, "rank": rank, "group_name": "0"}))
    PassManager(pipeline, ctx.report).run(gm, ctx)
    return gm, ctx


def _targets(gm) -> list[str]:
    return list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr"))


def _shard_loaded(path: str, rank: int, quantization=None):
    model, _ = load_model(path, deferred_weights=True)
    assert all(is_deferred(p) for p in model.parameters())  # nothing was read to build it
    gm, ctx = _passes(export_model(model, 4, 64, 128), rank, quantization=quantization)
    assert all(is_deferred(getattr_path(gm, t)) or not t.startswith("m.") for t in _targets(gm))
    stats = shard_loading.materialize(gm, model, path, compile_cache.derive_ops())
    return gm, ctx, stats


@pytest.mark.parametrize("family", ["mixtral", "llama_tied", "llama_int8", "mixtral_int8"])
def test_rank_reads_only_its_shard_and_matches_the_whole_load(tmp_path, family):
    """Rank 1 of 2 (the upper vocab half, the second block of every cut): every graph tensor equals the old
    path's bit for bit; the bytes read are counted per checkpoint tensor. ``llama_int8``: the quantized weights
    and their scales are recipes over the fused, sharded checkpoint slices (each slice read once)."""
    quantization = "int8-weight" if family.endswith("_int8") else None
    if family.startswith("mixtral"):  # per-expert w1/w2/w3 on disk, stacked gate_up_proj/down_proj in the model
        model = _mixtral(num_hidden_layers=1)
    else:  # tied: lm_head is tied to the embedding: not in the checkpoint, found through the tie
        torch.manual_seed(0)
        model = make_model("llama", num_hidden_layers=1, tie_word_embeddings=family == "llama_tied").eval()
    path = _saved(tmp_path, model)
    ref, _ = _passes(export_model(load_model(path)[0], 4, 64, 128), rank=1, quantization=quantization)
    gm, ctx, stats = _shard_loaded(path, rank=1, quantization=quantization)
    if quantization:
        assert "quantized (weight-only int8" in ctx.report.quantization and any(t.startswith("quant_") for t in _targets(gm))
        assert ("MoE experts layers quantized" in ctx.report.quantization) == family.startswith("mixtral")
    if family.startswith("mixtral"):
        moe = next(p for p in ctx.report.passes if p.name == "match_moe")
        assert moe.num_matches == 1, moe.notes  # the value probes ran on seeded random stand-ins
    assert _targets(gm) == _targets(ref)
    for t in _targets(gm):
        assert torch.equal(getattr_path(gm, t), getattr_path(ref, t)), t
    leftovers = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if is_deferred(t)]
    assert leftovers == []
    # measured: what the slice reads returned, per checkpoint tensor
    assert stats.sharded and stats.full_reads_of_sharded() == []
    for key in stats.sharded:
        assert stats.bytes_read[key] <= stats.full_bytes[key] // 2, key
    replicated = sum(n for k, n in stats.bytes_read.items() if k not in stats.sharded)
    assert stats.total_read == pytest.approx((stats.checkpoint_bytes - replicated) / 2 + replicated, rel=0.01)
    assert 0.45 < stats.total_read / stats.checkpoint_bytes < 0.6
    local = sum(getattr_path(gm, t).numel() * getattr_path(gm, t).element_size() for t in _targets(gm)
                if not t.startswith("rope_"))
    if not quantization:  # nothing read twice (fused weights are concatenations of the reads)
        assert stats.total_read <= local


def test_unmapped_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path, make_model("llama", num_hidden_layers=1))
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.o_proj.weight_renamed"] = tensors.pop("model.layers.0.self_attn.o_proj.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    model, _ = load_model(path, deferred_weights=True)
    gm, _ = _passes(export_model(model, 4, 64, 128), rank=0)
    with pytest.raises(shard_loading.ShardLoadingError, match=r"m\.model\.layers\.0\.self_attn\.o_proj\.weight: no "
                                                             r"checkpoint tensor maps to it"):
        shard_loading.materialize(gm, model, path, compile_cache.derive_ops())


def test_shard_loading_needs_a_safetensors_directory(tmp_path):
    model = make_model("llama", num_hidden_layers=1)
    assert "in-memory" in shard_loading.unsupported_reason(model)
    assert "not a local checkpoint directory" in shard_loading.unsupported_reason(str(tmp_path / "missing"))
    path = _saved(tmp_path / "st", model)
    assert shard_loading.unsupported_reason(path) == ""
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    assert "no safetensors weights" in shard_loading.unsupported_reason(str(bin_only))
    from autodeploy.errors import UnsupportedModelError

    for spec in (model, "smollm2"):
        with pytest.raises(UnsupportedModelError, match="deferred weights need a local checkpoint directory"):
            load_model(spec, deferred_weights=True)


def test_probe_weights_are_seeded_and_restored(tmp_path):
    model, _ = load_model(_saved(tmp_path, make_model("llama", num_hidden_layers=1)), deferred_weights=True)
    deferred = dict(model.named_parameters())
    with probe_weights(model) as n:
        assert n == len(deferred)
        first = {k: p.detach().clone() for k, p in model.named_parameters()}
        assert not any(is_deferred(p) for p in first.values())
    assert all(p is deferred[k] for k, p in model.named_parameters())  # put back
    with probe_weights(model):
        assert all(torch.equal(first[k], p) for k, p in model.named_parameters())  # same seed, same values
    with probe_weights(model, ["model.norm.weight"]) as n:  # one region's tensors only
        assert n == 1 and not is_deferred(model.model.norm.weight) and is_deferred(model.lm_head.weight)
