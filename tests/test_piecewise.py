"""Piecewise graphs for prefill/mixed steps (autodeploy/lowering/piecewise.py), on CPU through the emulated capture: the
split, the probe of token dims and row-wise pieces, and the static-buffer plumbing (padding rows, cutting back,
copies into fixed addresses) against the eager graph. The real CUDA-graph capture is covered in test_gpu.py."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import autodeploy
from autodeploy.graph.utils import is_op
from autodeploy.lowering import direct_call_module
from autodeploy.metadata import SequenceChunk
from autodeploy.lowering.piecewise import PiecewiseGraphRunner, PiecewiseUnsupported

from helpers import rel_rms


@pytest.fixture(scope="module")
def cm():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return autodeploy.compile(LlamaForCausalLM(cfg).eval(), max_batch_size=8, max_seq_len=128, page_size=16)


def _runner(cm, gm=None):
    return PiecewiseGraphRunner(cm, gm or direct_call_module(cm.graph_module), buckets=(16, 32, 64), emulate=True)


def _chunks(spec, rng, page0=0):
    out, page = [], page0
    for n_new, cached in spec:
        need = -(-(cached + n_new) // 16)
        out.append(SequenceChunk([rng.randrange(128) for _ in range(n_new)], cached, list(range(page, page + need))))
        page += need
    return out


def test_split_puts_step_ops_alone(cm):
    runner = _runner(cm)
    eager = [s for s in runner.segments.values() if s.eager]
    pieces = [s for s in runner.segments.values() if not s.eager]
    # leading metadata segment, one per attention layer, the logits tail; a piece before each layer and the last
    assert len(eager) == 3 + 2 and len(pieces) == 3 + 1
    kinds = [s.eager for s in runner.segments.values()]
    assert kinds == [True] + [False, True] * 4
    # the pieces take the token inputs through static copies (dim 1 of [1, T]); the tail reads hidden rows
    first = pieces[0]
    assert sorted(t for t in first.arg_tokens if t is not None) == [1, 1]


def test_replay_matches_eager_across_buckets_and_compositions(cm):
    runner = _runner(cm)
    rng = random.Random(0)
    specs = [[(5, 0), (1, 7), (1, 3)], [(20, 0)], [(3, 10), (9, 0), (1, 30)], [(33, 0), (1, 5)],
             [(16, 0)], [(1, 3), (1, 5)], [(64, 0)], [(40, 0), (2, 17)], [(3, 0)]]
    for spec in specs:
        chunks = _chunks(spec, rng)
        ref = cm.forward(cm.packer.pack(chunks)).clone()  # writes the same KV the runner then rewrites
        out = runner.run(cm.packer.pack(chunks))
        out = (out[0] if isinstance(out, (tuple, list)) else out).reshape(ref.shape)
        assert rel_rms(out, ref) < 1e-5, spec
    assert runner.replays == {16: 5, 32: 1, 64: 3}
    assert sorted(runner.captured) == [16, 32, 64]


def test_all_logits_step(cm):
    """Every token's logits (prompt logprobs) come out of the eager tail with the step's own row count."""
    runner = _runner(cm)
    chunks = _chunks([(7, 0), (1, 9)], random.Random(1), page0=20)
    ref = cm.forward(cm.packer.pack(chunks, all_logits=True)).clone()
    out = runner.run(cm.packer.pack(chunks, all_logits=True))
    out = (out[0] if isinstance(out, (tuple, list)) else out).reshape(ref.shape)
    assert ref.shape[0] == 8 and rel_rms(out, ref) < 1e-5


def test_probe_leaves_cache_untouched(cm):
    for c in cm.caches.values():  # content the probe's own writes could not reproduce
        c.normal_()
    before = {k: c.clone() for k, c in cm.caches.items()}
    _runner(cm)
    assert all(torch.equal(before[k], c) for k, c in cm.caches.items())


def test_rejects_a_graph_that_mixes_tokens(cm):
    """A piece whose token rows depend on other tokens (here: subtracting the mean over tokens after the
    embedding) is found by the probe's row comparison, not replayed with padding."""
    gm = direct_call_module(cm.graph_module)
    emb = next(n for n in gm.graph.nodes if is_op(n, torch.ops.aten.embedding) and "embed_tokens" in str(n.args[0]))
    with gm.graph.inserting_after(emb):
        mean = gm.graph.call_function(torch.ops.aten.mean.dim, (emb, [1], True))
    with gm.graph.inserting_after(mean):
        centred = gm.graph.call_function(torch.ops.aten.sub.Tensor, (emb, mean))
    emb.replace_all_uses_with(centred, delete_user_cb=lambda u: u not in (mean, centred))
    gm.recompile()
    with pytest.raises(PiecewiseUnsupported, match="not row-wise"):
        _runner(cm, gm)


def test_step_ops_see_the_steps_own_rows(cm):
    """Attention and the logits tail get exactly the step's tokens (a kernel may check its inputs' row count
    against slot_mapping), never the bucket's padding."""
    runner = _runner(cm)
    runner.capture_all()  # captures run full buckets of dummy tokens
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, info, child):
            super().__init__()
            self.info, self.inner = info, child

        def forward(self, *args):
            seen.extend(args[i].shape[d] for i, d in enumerate(self.info.arg_tokens) if isinstance(d, int))
            return self.inner(*args)

    for name, info in runner.segments.items():
        if info.eager:
            seg = getattr(runner.split, name)
            seg.child = Spy(info, seg.child)
    runner.run(cm.packer.pack(_chunks([(6, 0), (1, 12), (1, 4)], random.Random(2), page0=40)))
    assert len(seen) >= 3 * 3 + 1 and set(seen) == {8}, seen  # q, k, v of each layer and the tail's rows


def test_a_failed_capture_falls_back_to_eager(cm, monkeypatch, caplog):
    runner = _runner(cm)

    def refuse(bucket):
        raise PiecewiseUnsupported("test refusal")

    monkeypatch.setattr(runner, "_capture", refuse)
    chunks = _chunks([(5, 0), (1, 9)], random.Random(3), page0=60)
    ref = cm.forward(cm.packer.pack(chunks)).clone()
    with caplog.at_level("WARNING"):
        out = runner.run(cm.packer.pack(chunks))
    out = (out[0] if isinstance(out, (tuple, list)) else out).reshape(ref.shape)
    assert rel_rms(out, ref) < 1e-6 and not runner.handles(6) and not runner.replays
    assert "piecewise CUDA graphs disabled (test refusal)" in caplog.text
