"""The triton backend end to end under TRITON_INTERPRET=1: a whole model compiled with backend="triton"
matches the torch backend on a mixed batch, with RoPE fused into the cache write and RMSNorm fused with the
residual add; auto selection never picks triton on CPU."""

import os

import pytest
import torch

import autodeploy
from autodeploy.graph_utils import is_op
from autodeploy.metadata import SequenceChunk
from helpers import rel_rms
from model_zoo import make_model

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")


def _mixed(cm, seqs):
    pages = {0: [10, 3, 4], 1: [5, 6, 7, 20], 2: [30, 31]}
    l1 = cm.forward(cm.pack([SequenceChunk(seqs[0][:8], 0, pages[0]), SequenceChunk(seqs[1][:5], 0, pages[1])],
                            all_logits=True))
    l2 = cm.forward(cm.pack([SequenceChunk(seqs[0][8:9], 8, pages[0]), SequenceChunk(seqs[1][5:], 5, pages[1]),
                             SequenceChunk(seqs[2], 0, pages[2])], all_logits=True))
    return l1, l2


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_triton_model_matches_torch_backend(family):
    model = make_model(family, "eager" if family == "gemma2" else "sdpa")
    kw = dict(max_batch_size=4, max_seq_len=64, page_size=4, num_pages=48)
    tri = autodeploy.compile(model, backend="triton", **kw)
    ref = autodeploy.compile(model, backend="torch", **kw)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 13, 7)]
    for a, b in zip(_mixed(tri, seqs), _mixed(ref, seqs)):
        assert rel_rms(a, b) < 1e-4
    graph = tri.graph_module.graph
    assert sum(is_op(n, torch.ops.autodeploy.triton_cached_attention_rope) for n in graph.nodes) == 2
    if family != "gemma2":  # Gemma's (1 + w) norms stay plain ops
        assert any(is_op(n, torch.ops.autodeploy.triton_fused_add_rms_norm) for n in graph.nodes)
    assert "fuse_rope_cache_write" in tri.explain() and "triton" in tri.explain()


def test_auto_never_picks_triton_on_cpu():
    cm = autodeploy.compile(make_model("llama"), max_batch_size=2, max_seq_len=32)
    assert cm.report.backend == "torch"
    assert "triton" in cm.report.rejected_backends
    assert "CUDA" in cm.report.rejected_backends["triton"]
