"""Never silently wrong: refuse a cached graph in which anything but the cached attention mixes tokens.

After cache insertion, every op that lets one token's result depend on another token's input must be a
cached-attention op or a cached stateful mixer op (autodeploy/ops/mixers/: causal conv, SSM scan): those are the
only mixers whose state (the KV cache, the per-sequence state slots) is carried across steps. Anything else
that mixes tokens (an attention form the matcher did not know, a Mamba/SSM scan, a causal conv1d over the sequence,
a linear-attention or delta-rule recurrence, a cumsum over tokens...) would run on each step's new tokens alone
and answer wrong. Instead of listing such ops (the list is never complete), this pass *measures* it:

1. a copy of the graph has every cached-attention op replaced by a token-local stand-in (each token's output is
   a function of its own q and v only), and every cached mixer op by its kind's token-local stand-in;
2. the copy runs on one probe prompt twice, with only token 0 changed;
3. if any other token's logits move, something else mixes tokens. Both runs are repeated node by node to find
   the first node whose output moved at another token; the model is refused naming that node's module path
   (``nn_module_stack``) and op.

Token-wise ops (linears, norms, RoPE tables, MoE routing, the logits gather) cannot move another token's output,
however they are written.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.probe_weights import probe_weights
from autodeploy.graph.utils import getattr_path, remove_dead_code
from autodeploy.metadata import SequenceChunk, nest_sequences
from autodeploy.ops.cached import cached_inputs, is_cached_attention
from autodeploy.ops.mixers import cached_mixer_kind

log = logging.getLogger(__name__)

_PROBE_LENGTHS = (13, 11, 17, 19, 23, 29, 31, 7, 5)


def token_local_standin(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """What a cached-attention op becomes in the probe: ``[T, Hq, Dv]`` from each token's own q and v."""
    group = q.shape[1] // v.shape[1]
    return v.repeat_interleave(group, dim=1) + q.sum(-1, keepdim=True)


class SequenceMixerError(UnsupportedModelError):
    """A layer mixes tokens outside the cached attention: it would run without its state across steps."""


def _probe_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for node in list(graph.nodes):
        if is_cached_attention(node):
            inputs = cached_inputs(node)
            with graph.inserting_before(node):
                new = graph.call_function(token_local_standin, (inputs["q"], inputs["v"]))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif (kind := cached_mixer_kind(node)) is not None:
            inputs = kind.inputs(node, kind.cached_inputs)
            with graph.inserting_before(node):  # the canonical inputs only: the state and step inputs die
                kwargs = {n: inputs[n] for n in kind.canonical_inputs}
                new = graph.call_function(kind.standin, (), kwargs)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    probe = fx.GraphModule(gm, graph)
    remove_dead_code(probe)
    probe.recompile()
    return probe


def _static_dims(gm: fx.GraphModule) -> set[int]:
    dims = set()
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        for t in tree_flatten(v)[0]:
            if isinstance(t, torch.Tensor):
                dims.update(d for d in t.shape if isinstance(d, int))
    return dims


def _probe_length(gm: fx.GraphModule, limit: int) -> int:
    taken = _static_dims(gm)
    for n in _PROBE_LENGTHS:
        if n not in taken and n <= limit:
            return n
    return max(2, min(limit, 13))


def _inputs(probe: fx.GraphModule, ids: list[int], page_size: int, device: torch.device) -> list:
    pages = list(range(1, -(-len(ids) // page_size) + 1))
    names = {n.target for n in probe.graph.nodes if n.op == "placeholder"}
    batch = nest_sequences([SequenceChunk(ids, 0, pages)], page_size, device=device, all_logits=True,
                           state_slots="state_slots" in names)
    args = []
    for node in probe.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.target in batch.inputs:
            args.append(batch.inputs[node.target])
        elif node.users:
            raise ValueError(f"the graph reads input {node.target!r}, which a probe step cannot provide")
        else:
            args.append(torch.empty(0, device=device))
    return args


def _tolerance(x: torch.Tensor) -> float:
    eps = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    return eps * max(float(x.abs().max()), 1e-6) if x.numel() else 0.0


def _moved_elsewhere(a: Any, b: Any, length: int) -> bool:
    """Did ``b`` differ from ``a`` at a token other than 0 (along every dim of the probe's length)?"""
    if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.shape != b.shape:
        return False
    diff = (a.float() - b.float()).abs()
    tol = _tolerance(a.float())
    token_dims = [i for i, d in enumerate(a.shape) if d == length]
    if not token_dims:
        return False
    return any(bool((diff.narrow(d, 1, length - 1) > tol).any()) for d in token_dims)


class _Recorder(fx.Interpreter):
    """Runs the probe recording every node's output; with ``against``, stops at the first node whose output
    moved at another token than 0."""

    def __init__(self, gm: fx.GraphModule, length: int, against: Optional[dict] = None):
        super().__init__(gm)
        self.length, self.against, self.values, self.culprit = length, against, {}, None

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.against is None:
            if isinstance(out, torch.Tensor):
                self.values[n.name] = out.detach().clone()
        elif self.culprit is None and n.name in self.against and _moved_elsewhere(self.against[n.name], out,
                                                                                self.length):
            self.culprit = n
            raise _Found()
        return out


class _Found(Exception):
    pass


def describe(node: fx.Node) -> str:
    """The module path and op of a node, for the user (``nn_module_stack``, else the node name)."""
    stack = node.meta.get("nn_module_stack") or {}
    where = ""
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        path = str(path).removeprefix("L__self__").lstrip("._").removeprefix("m.") or str(path)
        where = f"layer {path} ({cls_name.rsplit('.', 1)[-1]}), "
    target = getattr(node.target, "__name__", str(node.target))
    return f"{where}op {target} (node {node.name})"


@register_pass("check_sequence_mixers")
def check_sequence_mixers(gm: fx.GraphModule, ctx) -> PassResult:
    with probe_weights(gm):  # deferred weights (a tensor-parallel rank before it reads its shard): random stand-ins
        return _check(gm, ctx)


def _check(gm: fx.GraphModule, ctx) -> PassResult:
    probe = _probe_module(gm)
    length = _probe_length(gm, ctx.max_seq_len)
    backend = getattr(ctx, "attention_backend", None)
    page_size = ctx.page_size or getattr(backend, "default_page_size", 16) or 16
    g = torch.Generator().manual_seed(0)
    vocab = _vocab_size(gm)
    ids = torch.randint(0, vocab, (length,), generator=g).tolist()
    other = list(ids)
    other[0] = (ids[0] + 1 + vocab // 2) % vocab
    try:
        with torch.no_grad():
            base = probe(*_inputs(probe, ids, page_size, ctx.device))
            moved = probe(*_inputs(probe, other, page_size, ctx.device))
    except Exception as exc:
        raise SequenceMixerError(
            f"the cached graph could not be checked for token mixing outside the cached attention "
            f"({type(exc).__name__}: {exc}); refusing rather than risking wrong answers") from exc
    outs = [(a, b) for a, b in zip(tree_flatten(base)[0], tree_flatten(moved)[0])]
    if not any(_moved_elsewhere(a, b, length) for a, b in outs):
        stateful = any(cached_mixer_kind(n) is not None for n in gm.graph.nodes)
        what = "the cached attention and the cached stateful mixers mix" if stateful else "the cached attention mixes"
        return PassResult(0, [f"only {what} tokens (probe of {length} tokens)"])
    culprit = _locate(probe, ids, other, page_size, ctx.device, length)
    notes = "; ".join(f"{n}: {why}" for n, why in getattr(ctx, "unmatched_attention", []))
    raise SequenceMixerError(
        f"{describe(culprit) if culprit is not None else 'some op'} mixes information across tokens outside the "
        "cached attention: an attention form the matcher did not convert, or a recurrent/SSM/conv layer whose "
        "state is not carried across steps. It would answer wrong, so the model is refused"
        + (f" (attention matcher notes: {notes})" if notes else ""))


def _locate(probe, ids, other, page_size, device, length) -> Optional[fx.Node]:
    with torch.no_grad():
        first = _Recorder(probe, length)
        first.run(*_inputs(probe, ids, page_size, device))
        second = _Recorder(probe, length, against=first.values)
        try:
            second.run(*_inputs(probe, other, page_size, device))
        except _Found:
            pass
    return second.culprit


def _vocab_size(gm: fx.GraphModule) -> int:
    """A token-id bound valid for every embedding lookup of the graph (the probe's token ids must be valid):
    the smallest table, since lookups by position (a tabulated RoPE) can have fewer rows than the vocabulary."""
    rows = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "embedding" in str(node.target) and node.args:
            w = node.args[0]
            t = getattr_path(gm, w.target) if isinstance(w, fx.Node) and w.op == "get_attr" else None
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                rows.append(int(t.shape[0]))
    return min(rows) if rows else 2
