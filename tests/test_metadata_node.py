"""The headline contract: exactly one prepare_metadata node, consumed by every cached-attention node, and no
per-layer metadata arithmetic left in the graph."""

import operator

import pytest
import torch

import autodeploy
from autodeploy.graph.utils import aten, is_op
from autodeploy.metadata import SequenceChunk, nest_sequences
from model_zoo import make_model

# Ops that build masks, offsets or positions. None may survive outside prepare_metadata.
METADATA_ARITHMETIC = (aten.arange, aten.cumsum, aten.searchsorted, aten.le, aten.lt, aten.ge, aten.gt, aten.eq,
                       aten.__and__, aten.logical_and, aten.where, aten.new_ones, aten.diff, aten.index,
                       aten.scaled_dot_product_attention, aten.softmax, aten.tril, aten.triu)


@pytest.mark.parametrize("layers", [1, 2, 6])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exactly_one_metadata_node(layers, family):
    model = make_model(family, "sdpa", num_hidden_layers=layers)
    cm = autodeploy.compile(model, max_batch_size=2, max_seq_len=32)
    graph = cm.graph_module.graph
    prep = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.prepare_metadata)]
    assert len(prep) == 1
    cached = [n for n in graph.nodes if is_op(n, torch.ops.autodeploy.torch_cached_attention)]
    assert len(cached) == layers
    for node in cached:
        meta_args = node.args[10]
        assert meta_args and all(is_op(a, operator.getitem) and a.args[0] is prep[0] for a in meta_args)
    leftovers = sorted({str(n.target) for n in graph.nodes if is_op(n, *METADATA_ARITHMETIC)})
    assert not leftovers, f"per-layer metadata arithmetic left in graph: {leftovers}"


def test_nest_sequences_packs_prefill_first_with_one_buffer():
    chunks = [SequenceChunk([5], 3, [2]), SequenceChunk([1, 2, 3], 0, [0]), SequenceChunk([7, 8], 4, [1, 3])]
    b = nest_sequences(chunks, page_size=4)
    assert b.order == [1, 2, 0]
    assert b.inputs["input_ids"].tolist() == [[1, 2, 3, 7, 8, 5]]
    assert b.inputs["position_ids"].tolist() == [[0, 1, 2, 4, 5, 3]]
    assert b.inputs["cu_seqlens_q"].tolist() == [0, 3, 5, 6]
    assert b.inputs["seq_lens_kv"].tolist() == [3, 6, 4]
    assert b.inputs["page_table"].tolist() == [[0, 0], [1, 3], [2, 0]]
    assert b.inputs["slot_mapping"].tolist() == [0, 1, 2, 12, 13, 11]
    assert b.inputs["logits_index"].tolist() == [2, 4, 5]
    assert b.inputs["batch_info"].tolist() == [2, 5, 1, 3]
    storages = {t.untyped_storage().data_ptr() for k, t in b.inputs.items() if k != "batch_info"}
    assert len(storages) == 1, "all device inputs must come from one buffer (one H2D copy)"


def test_nest_sequences_rejects_missing_pages():
    with pytest.raises(ValueError, match="needs 2"):
        nest_sequences([SequenceChunk([1, 2, 3], 2, [0])], page_size=4)


def test_prepare_metadata_fields():
    b = nest_sequences([SequenceChunk([1, 2, 3], 0, [0]), SequenceChunk([7, 8], 4, [1, 3])], page_size=4)
    i = b.inputs
    seq_idx, off, pos = torch.ops.autodeploy.prepare_metadata(
        i["position_ids"], i["cu_seqlens_q"], i["seq_lens_kv"], i["page_table"], i["batch_info"],
        "seq_idx,tok_offset,q_abs_pos")
    assert seq_idx.tolist() == [0, 0, 0, 1, 1]
    assert off.tolist() == [0, 1, 2, 0, 1]
    assert pos.tolist() == i["position_ids"][0].tolist()


def test_decode_fast_path_equals_general_path():
    import random

    rng = random.Random(0)
    chunks = []
    for i in range(9):
        cached = rng.randint(0, 30)
        chunks.append(SequenceChunk([rng.randrange(100)], cached, [rng.randrange(50) for _ in range(cached // 4 + 1)]))
    fast = nest_sequences(chunks, page_size=4)  # every chunk decodes and wants logits
    general = nest_sequences(chunks, page_size=4, all_logits=True)  # same rows, general code path
    for name, t in general.inputs.items():
        assert fast.inputs[name].tolist() == t.tolist(), name
    assert fast.order == general.order and fast.logits_rows == general.logits_rows
    with pytest.raises(ValueError, match="needs"):
        nest_sequences([SequenceChunk([1], 8, [0, 1])], page_size=4)


def test_step_nbytes_is_the_packed_size():
    """A CUDA-graph bucket's buffer (sized by step_nbytes) holds a padded decode step, and a device-composed
    mixed step, exactly: a buffer one 16-byte section smaller is refused."""
    import pytest
    import torch

    from autodeploy.metadata import SequenceChunk, nest_sequences, step_nbytes

    for n, bucket, width in ((1, 1, 3), (3, 4, 5), (5, 8, 2)):
        chunks = [SequenceChunk([7], 4 + i % 4, [i, i + 10]) for i in range(n)]
        size = step_nbytes(bucket, bucket, width)
        batch = nest_sequences(chunks, 4, pad_to=bucket, pad_page=99, pages_width=width,
                               target=torch.zeros(size, dtype=torch.uint8))
        assert batch.inputs["page_table"].shape == (bucket, width)
        with pytest.raises(ValueError, match="static input buffer"):
            nest_sequences(chunks, 4, pad_to=bucket, pad_page=99, pages_width=width,
                           target=torch.zeros(size - 16, dtype=torch.uint8))
    chunks = [SequenceChunk([5] * 6, 0, [3, 4]), SequenceChunk([7], 4, [1, 2])]
    size = step_nbytes(16, 4, 3)
    batch = nest_sequences(chunks, 4, pages_width=3, compose_on_device=(16, 4),
                           target=torch.zeros(size, dtype=torch.uint8))
    with pytest.raises(ValueError, match="static input buffer"):
        nest_sequences(chunks, 4, pages_width=3, compose_on_device=(16, 4),
                       target=torch.zeros(size - 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="does not fit"):
        nest_sequences(chunks, 4, pages_width=3, compose_on_device=(4, 4))


def test_device_composed_padding():
    """Padding tokens come after every sequence and write nowhere; padding sequences are empty; batch_info says
    the composition lives on the device; the real part equals the unpadded packing."""
    import torch

    from autodeploy.metadata import DEVICE_COMPOSED, SequenceChunk, nest_sequences

    chunks = [SequenceChunk([1], 5, [0, 1]), SequenceChunk([2, 3, 4], 0, [2]), SequenceChunk([9], 2, [3])]
    plain = nest_sequences(chunks, 4, pages_width=3)
    padded = nest_sequences(chunks, 4, pages_width=3, compose_on_device=(8, 6))
    p, q = plain.inputs, padded.inputs
    assert q["batch_info"].tolist() == [DEVICE_COMPOSED, 8, 6, 8]
    assert q["input_ids"].shape == (1, 8) and q["page_table"].shape == (6, 3)
    assert q["input_ids"][0, :5].tolist() == p["input_ids"][0].tolist()
    assert q["slot_mapping"].tolist() == p["slot_mapping"].tolist() + [-1] * 3
    assert q["position_ids"][0, 5:].tolist() == [0] * 3
    assert q["cu_seqlens_q"].tolist() == p["cu_seqlens_q"].tolist() + [5] * 3
    assert q["seq_lens_kv"].tolist() == p["seq_lens_kv"].tolist() + [0] * 3
    assert q["logits_index"].tolist() == p["logits_index"].tolist() + [0] * 3
    assert torch.equal(q["page_table"][:3], p["page_table"]) and not q["page_table"][3:].any()
    assert padded.logits_rows == plain.logits_rows and padded.order == plain.order
