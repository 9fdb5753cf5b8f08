"""The RoPE table pass: its rows are exactly HF's cos/sin, it declines computations that mix positions, and the
packer refuses positions past the table."""

from types import SimpleNamespace

import pytest
import torch

import autodeploy
from autodeploy.metadata import SequenceChunk, nest_sequences
from autodeploy.passes.tabulate_rope import TABLE_NAME, tabulate_rope
from model_zoo import make_model


def _note(cm, name="tabulate_rope"):
    return next(p for p in cm.report.passes if p.name == name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_table_rows_are_hf_cos_sin(family):
    model = make_model(family)
    cm = autodeploy.compile(model, backend="torch", lowering="eager", max_batch_size=2, max_seq_len=96)
    record = _note(cm)
    tables = sorted(n for n, _ in cm.graph_module.named_buffers() if n.startswith(TABLE_NAME))
    assert record.num_matches == len(tables) >= 1, record.notes
    if family == "gemma3":  # local and global attention rotate with different bases: one table each
        assert len(tables) == 2
    pos = torch.tensor([[0, 1, 17, 95]])
    x = torch.zeros(1, 4, 8)
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    hf = []
    for rot in rotaries:  # gemma3's one module holds a rope per layer type
        kinds = sorted(rot.rope_type) if isinstance(rot.rope_type, dict) else [None]
        for cos, sin in (rot(x, pos) if kind is None else rot(x, pos, kind) for kind in kinds):
            hf.append(torch.cat([cos[0], sin[0]], -1))
    for name in tables:
        table = getattr(cm.graph_module, name)
        assert table.shape[0] == 96
        rows = table[pos[0]]
        # every table is exactly one of the model's rotary embeddings
        assert any(torch.equal(rows, ref) for ref in hf), name


class _Rope(torch.nn.Module):
    def __init__(self, mix_positions: bool):
        super().__init__()
        self.mix = mix_positions
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8))

    def forward(self, q, k, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        if self.mix:  # a dynamic scaling by the batch's longest position: not a per-position function
            freqs = freqs / (position_ids.max() + 1).float()
        emb = torch.cat([freqs, freqs], -1)
        return torch.ops.autodeploy.rope(q, k, emb.cos(), emb.sin())


def _exported(mix: bool):
    t = torch.export.Dim("t", min=2, max=64)
    args = (torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.arange(5)[None])
    ep = torch.export.export(_Rope(mix), args, dynamic_shapes=({2: t}, {2: t}, {1: t}))
    return ep.module(), args


@pytest.mark.parametrize("mix", [False, True])
def test_only_position_wise_cos_sin_is_tabulated(mix):
    gm, args = _exported(mix)
    q, k = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    pos = torch.tensor([[30, 2, 9, 0, 31, 5, 6]])
    before = gm(q, k, pos)
    result = tabulate_rope(gm, SimpleNamespace(max_seq_len=32, device=torch.device("cpu")))
    after = gm(q, k, pos)
    if mix:
        assert result.num_matches == 0 and "depend on the other positions" in result.notes[0]
    else:
        assert result.num_matches == 1, result.notes
        assert any(n.op == "get_attr" and n.target.startswith(TABLE_NAME) for n in gm.graph.nodes)
    for a, b in zip(after, before):
        assert torch.equal(a, b)


def test_packer_rejects_positions_past_max_seq_len():
    ok = nest_sequences([SequenceChunk([1], 7, [0, 1])], page_size=4, max_seq_len=8)  # position 7: the last
    assert ok.inputs["position_ids"].tolist() == [[7]]
    with pytest.raises(ValueError, match="past the compiled max_seq_len 8"):
        nest_sequences([SequenceChunk([1], 8, [0, 1, 2])], page_size=4, max_seq_len=8)  # decode fast path
    with pytest.raises(ValueError, match="past the compiled max_seq_len 8"):
        nest_sequences([SequenceChunk([1, 2, 3], 6, [0, 1, 2])], page_size=4, max_seq_len=8)  # prefill path
