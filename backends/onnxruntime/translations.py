"""ONNX translations (onnxscript) of the ops a compiled graph holds, for torch.onnx's dynamo exporter.

Choices, checked against onnxruntime 1.31's CPU execution provider (tests/test_onnx_export.py):

* attention -> the standard opset-23 ``Attention`` op (GQA by head counts, a boolean mask, ``scale`` and
  ``softcap`` attributes; rows without a visible key come out zero). The paged cache is gathered per sequence
  around it (``Gather`` + ``ScatterND``), queries are padded per sequence, and ``GatherND`` flattens back.
  ``Attention`` has no sink logits, so the backend refuses sinks.
* rms_norm -> opset-23 ``RMSNormalization`` (fp32 stash, then scale: HF's order) when input and weight share a
  dtype; the decomposition otherwise (ONNX wants one dtype for both).
* rope -> the rotate-half decomposition. ``RotaryEmbedding`` takes half-width cos/sin and assumes both halves
  of the canonical full-width tables are equal, which the op's contract does not promise.
* prepare_metadata -> one ONNX subgraph per derived field, by name (:data:`FIELD_TRANSLATIONS`); a field with no
  translation is refused at export with its name.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from onnx import TensorProto
from onnxscript import opset23 as op

from autodeploy.errors import UnsupportedModelError

INT64, INT32, FLOAT = TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT


def _c(values: Sequence[int]):
    return op.Constant(value_ints=list(values))


def _tokens(m: dict):
    """``[T]`` int32 token indices 0..T-1 (T from position_ids ``[1, T]``)."""
    n = op.Squeeze(op.Shape(m["position_ids"], start=1, end=2), _c([0]))
    return op.Cast(op.Range(op.Constant(value_int=0), n, op.Constant(value_int=1)), to=INT32)


def _field_q_lens(m: dict):
    cu = m["cu_seqlens_q"]
    return op.Sub(op.Slice(cu, _c([1]), _c([2**62])), op.Slice(cu, _c([0]), _c([-1])))


def _field_seq_idx(m: dict):
    """Count of sequence ends ``cu_seqlens_q[1:]`` at or before each token (searchsorted, right)."""
    ends = op.Unsqueeze(op.Slice(m["cu_seqlens_q"], _c([1]), _c([2**62])), _c([0]))  # [1, B]
    tok = op.Unsqueeze(_derive(m, "_tok"), _c([1]))  # [T, 1]
    return op.Cast(op.ReduceSum(op.Cast(op.LessOrEqual(ends, tok), to=INT32), _c([1]), keepdims=0), to=INT32)


def _field_tok_offset(m: dict):
    return op.Sub(_derive(m, "_tok"), op.Gather(m["cu_seqlens_q"], _derive(m, "seq_idx"), axis=0))


def _field_q_abs_pos(m: dict):
    seq = _derive(m, "seq_idx")
    start = op.Sub(op.Gather(m["seq_lens_kv"], seq, axis=0), op.Gather(_derive(m, "q_lens"), seq, axis=0))
    return op.Add(start, _derive(m, "tok_offset"))


FIELD_TRANSLATIONS: dict[str, Callable[[dict], object]] = {
    "_tok": _tokens, "q_lens": _field_q_lens, "seq_idx": _field_seq_idx, "tok_offset": _field_tok_offset,
    "q_abs_pos": _field_q_abs_pos,
}


def _derive(m: dict, name: str):
    """A field's ONNX subgraph, built once per export and shared by every reader (as in metadata/fields.py)."""
    if name not in m:
        m[name] = FIELD_TRANSLATIONS[name](m)
    return m[name]


def prepare_metadata(position_ids, cu_seqlens_q, seq_lens_kv, page_table, batch_info, fields: str):
    """The one metadata node: every requested field, computed once for all layers."""
    unknown = [f for f in fields.split(",") if f not in FIELD_TRANSLATIONS]
    if unknown:
        raise UnsupportedModelError(f"metadata fields {unknown} have no ONNX translation "
                                    f"(known: {sorted(k for k in FIELD_TRANSLATIONS if k[0] != '_')})")
    m = dict(position_ids=position_ids, cu_seqlens_q=cu_seqlens_q, seq_lens_kv=seq_lens_kv, page_table=page_table)
    return tuple(_derive(m, name) for name in fields.split(","))


def rms_norm(x, weight, eps: float):
    if x.dtype == weight.dtype:
        return op.RMSNormalization(x, weight, epsilon=eps, axis=-1, stash_type=FLOAT)
    h = op.Cast(x, to=FLOAT)
    h = op.Mul(h, op.Reciprocal(op.Sqrt(op.Add(op.ReduceMean(op.Mul(h, h), _c([-1]), keepdims=1),
                                               op.Constant(value_float=eps)))))
    out_t = weight.dtype if weight.dtype.itemsize >= x.dtype.itemsize else x.dtype
    return op.Mul(op.Cast(weight, to=out_t), op.Cast(op.CastLike(h, x), to=out_t))


def _rotate(x, cos, sin):
    first, second = op.Split(x, num_outputs=2, axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(second), first, axis=-1), sin))


def rope(q, k, cos, sin):
    """q/k ``[B, H, S, D]``, cos/sin ``[B, S, D]`` (HF rotate-half convention)."""
    cos, sin = op.Unsqueeze(cos, _c([1])), op.Unsqueeze(sin, _c([1]))
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _sequence_major(cache, page_table, new, index):
    """``[B, H, L, D]``: the sequences' pages gathered, this step's rows scattered in (see ops.py)."""
    g = op.Gather(cache, page_table, axis=0)  # [B, MP, P, H, D]
    g = op.Reshape(g, op.Concat(op.Shape(page_table, start=0, end=1), _c([-1]), op.Shape(cache, start=2), axis=0))
    g = op.ScatterND(g, index, op.CastLike(new, g))
    return op.Transpose(g, perm=[0, 2, 1, 3])


def engine_paged_attention(q, k, v, k_cache, v_cache, cu_seqlens_q, seq_lens_kv, page_table, seq_idx, tok_offset,
                           q_abs_pos, scale: float, sliding_window: Optional[int] = None,
                           logit_softcap: Optional[float] = None):
    seq = op.Unsqueeze(op.Cast(seq_idx, to=INT64), _c([1]))
    kv_index = op.Concat(seq, op.Unsqueeze(op.Cast(q_abs_pos, to=INT64), _c([1])), axis=1)  # [T, 2]
    q_index = op.Concat(seq, op.Unsqueeze(op.Cast(tok_offset, to=INT64), _c([1])), axis=1)
    keys = _sequence_major(k_cache, page_table, k, kv_index)  # [B, Hkv, L, D]
    values = _sequence_major(v_cache, page_table, v, kv_index)
    q_lens = op.Cast(_field_q_lens({"cu_seqlens_q": cu_seqlens_q}), to=INT64)
    max_q = op.ReduceMax(q_lens, _c([0]), keepdims=1)  # [1]
    n_seq = op.Shape(page_table, start=0, end=1)
    pad_shape = op.Concat(n_seq, max_q, op.Shape(q, start=1), axis=0)
    q_pad = op.ScatterND(op.Expand(op.CastLike(op.Constant(value_float=0.0), q), pad_shape), q_index, q)
    q_pad = op.Transpose(q_pad, perm=[0, 2, 1, 3])  # [B, Hq, max_q, D]
    # Mask [B, 1, max_q, L]: key j visible to query row i of sequence b iff 0 <= pos(b, i) - j (< window).
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    rows = op.Range(zero, op.Squeeze(max_q, _c([0])), one)  # [max_q]
    num_keys = op.Squeeze(op.Shape(keys, start=2, end=3), _c([0]))
    cols = op.Range(zero, num_keys, one)  # [L]
    start = op.Sub(op.Cast(seq_lens_kv, to=INT64), q_lens)  # [B]
    q_pos = op.Add(op.Unsqueeze(start, _c([1])), op.Unsqueeze(rows, _c([0])))  # [B, max_q]
    diff = op.Sub(op.Unsqueeze(q_pos, _c([2])), op.Unsqueeze(cols, _c([0, 1])))  # [B, max_q, L]
    allowed = op.GreaterOrEqual(diff, op.Constant(value_int=0))
    if sliding_window is not None and sliding_window > 0:
        allowed = op.And(allowed, op.Less(diff, op.Constant(value_int=int(sliding_window))))
    mask = op.Unsqueeze(allowed, _c([1]))
    attrs = {"scale": float(scale), "softmax_precision": FLOAT}  # softmax in fp32 (docs/contracts.md)
    if logit_softcap is not None and logit_softcap > 0:
        attrs["softcap"] = float(logit_softcap)
    out = op.Attention(op.CastLike(q_pad, keys), keys, values, mask, **attrs)[0]  # Y [B, Hq, max_q, Dv]
    out = op.Transpose(out, perm=[0, 2, 1, 3])
    return op.CastLike(op.GatherND(out, q_index), q)


def translation_table() -> dict:
    """torch op -> translation, for ``torch.onnx.export(custom_translation_table=...)``."""
    import torch

    import autodeploy.backends.onnxruntime.ops  # noqa: F401  (registers engine_paged_attention)

    return {
        torch.ops.autodeploy.prepare_metadata.default: prepare_metadata,
        torch.ops.autodeploy.rms_norm.default: rms_norm,
        torch.ops.autodeploy.rope.default: rope,
        torch.ops.autodeploy.engine_paged_attention.default: engine_paged_attention,
    }
