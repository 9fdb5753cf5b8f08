"""Match the attention forms HF emits and replace them with ``autodeploy::attention`` (parameters by name).

* ``aten.scaled_dot_product_attention(q, k, v, mask, ..., is_causal, scale, enable_gqa)``
* eager chains: a ``q @ k^T`` (``matmul``/``bmm``/``baddbmm``, 4-D or heads-flattened 3-D) whose scores go
  through any affine mix of scaling, masking and additive biases (``+ mask``, ``where``, ``masked_fill``,
  ``* mask + (1 - mask) * -1e4``, ``/ c``...) into one ``softmax`` and then ``probs @ v``.

Nothing is trusted from the op sequence alone. The score expression is **proven** by probing: its subgraph is
cut at the ``q @ k^T`` node and evaluated on probe sequences with that node set to 0 and to random values, which
must give ``E(M) = scale * M + bias`` with one constant ``scale`` on every visible entry. The visibility pattern
must be causal, exactly, plus at most one registered mask variant (window, chunk); a non-zero bias must be
explained by a registered bias variant. Non-affine pieces come from variants' eager forms (softcap on
the chain, sinks around the softmax). A scores node with users outside the matched chain refuses the match.
Whatever is left alone is reported (and the sequence-mixer check refuses the model).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional, Union

import torch
from torch import fx

from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import ancestors, arg, aten, is_op, val
from autodeploy.ops.variants import variants

_CASTS = (aten.to, aten._to_copy, aten.type_as)
_VIEWS = (aten.view, aten.reshape, aten._unsafe_view)
_QK = (aten.matmul, aten.bmm, aten.baddbmm)
# Ops an affine score chain may contain between the q.k^T node and the softmax (proven affine by probing).
_CHAIN_OPS = _CASTS + _VIEWS + (
    aten.add, aten.sub, aten.mul, aten.div, aten.where, aten.masked_fill, aten.max, aten.maximum, aten.clamp,
    aten.clamp_min, aten.clone, aten.contiguous, aten.expand, aten.mul_, aten.add_, aten.div_, aten.rsub,
    aten.neg, aten.alias, aten.detach,
)
# Entries at or below this are masked: exp underflows to exactly 0 next to any realistic score.
MASKED = -1e4


class ScoreProbe:
    """Evaluates score and mask subgraphs on probe sequences (batch 1, ``size`` tokens, positions 0..size-1)."""

    def __init__(self, gm: fx.GraphModule, max_seq_len: int):
        self.gm = gm
        self.limit = max(2, int(max_seq_len))
        self._memo: dict[Any, Any] = {}
        ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "input_ids"), None)
        shape = val(ids).shape if val(ids) is not None else ()
        self._syms = {str(d): i for i, d in enumerate(shape) if not isinstance(d, int)}

    def sizes(self, expr: fx.Node, cut: Optional[fx.Node] = None) -> list[int]:
        """Probe sizes: a small one, and one past every integer constant of the mask side of ``expr`` (so a
        window or chunk shows up)."""
        nodes = ancestors([expr], stop=cut)
        if cut is not None:
            nodes -= ancestors([cut])
        cands = set()
        for node in nodes:
            for a in list(node.args) + list(node.kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and 1 < a < self.limit:
                    cands.add(a)
        top = max(cands) if cands else 0
        return sorted({min(self.limit, 37), min(self.limit, max(64, top + 2))})

    def _concrete(self, shape, size: int) -> list[int]:
        """A recorded (symbolic) shape at the probe's batch 1 and ``size`` tokens."""
        subs = {}
        for d in shape:
            if not isinstance(d, int):
                for s in d.node.expr.free_symbols:
                    role = self._syms.get(str(s))
                    if role is None:
                        raise ValueError(f"shape {tuple(shape)} depends on {s}, not on the input sizes")
                    subs[s] = 1 if role == 0 else size
        return [int(d) if isinstance(d, int) else int(d.node.expr.xreplace(subs)) for d in shape]

    def _inputs(self, sub: fx.GraphModule, size: int, cut_value: Optional[torch.Tensor]) -> list:
        device = _device(self.gm)
        out = []
        for node in sub.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.target == "input_ids":
                out.append(torch.zeros(1, size, dtype=torch.long, device=device))
            elif node.target == "position_ids":
                out.append(torch.arange(size, device=device)[None])
            elif node.target == "__cut__":
                out.append(cut_value)
            else:
                raise ValueError(f"the score expression depends on graph input {node.target!r}")
        return out

    def evaluate(self, expr: fx.Node, size: int, cut: Optional[fx.Node] = None,
                 cut_values: tuple = ()) -> list[torch.Tensor]:
        """``expr`` on a probe of ``size`` tokens, once per value of ``cut`` (a node replaced by an input)."""
        sub = _cut_subgraph(self.gm, expr, cut)
        shape = self._concrete(val(cut).shape, size) if cut is not None else None
        outs = []
        with torch.no_grad():
            for make in cut_values or (None,):
                value = make(shape, val(cut).dtype) if cut is not None else None
                out = sub(*self._inputs(sub, size, value))
                outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs, (None if cut is None else shape)


def _device(gm: fx.GraphModule) -> torch.device:
    for p in gm.parameters():
        return p.device
    for b in gm.buffers():
        return b.device
    return torch.device("cpu")


def _cut_subgraph(gm: fx.GraphModule, output: fx.Node, cut: Optional[fx.Node]) -> fx.GraphModule:
    """A runnable module computing ``output`` from the graph inputs, with ``cut`` (if given) an input named
    ``__cut__``. A ``baddbmm`` cut keeps its bias operand: it becomes ``beta * bias + alpha * __cut__``."""
    needed = ancestors([output], stop=cut)
    if is_op(cut, aten.baddbmm):
        needed |= ancestors([cut.args[0]])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    ph = graph.placeholder("__cut__") if cut is not None else None
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node is cut:
            if is_op(cut, aten.baddbmm):
                beta, alpha = cut.kwargs.get("beta", 1.0), cut.kwargs.get("alpha", 1.0)
                b = graph.call_function(aten.mul.Tensor, (env[cut.args[0]], beta))
                m = graph.call_function(aten.mul.Tensor, (ph, alpha))
                env[node] = graph.call_function(aten.add.Tensor, (b, m))
            else:
                env[node] = ph
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[output])
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------------------
# verdicts on probed visibility and bias


def _verdict(probe: ScoreProbe, key: Any, evaluate, num_heads: int, sizes: list[int]) -> Union[dict, str]:
    """Run ``evaluate(size) -> (allowed [Hb, Sq, Skv] bool, bias [Hb, Sq, Skv] or None)`` at the probe sizes and
    explain it as causal + mask variants + bias variants. Returns the variant parameters by name, or why not."""
    if key is not None and key in probe._memo:
        return probe._memo[key]
    try:
        verdict = _verdict_uncached(sizes, evaluate, num_heads)
    except Exception as exc:  # report, never crash the compile
        verdict = f"score/mask expression could not be evaluated ({type(exc).__name__}: {exc})"
    if key is not None:
        probe._memo[key] = verdict
    return verdict


def _verdict_uncached(sizes, evaluate, num_heads) -> Union[dict, str]:
    seen: list[dict] = []
    for size in sizes:
        allowed, bias = evaluate(size)
        allowed, bias = allowed.cpu(), (None if bias is None else bias.cpu())
        if not bool((allowed == allowed[:1]).all()):
            return "visibility differs across batch/heads"
        vis = allowed[0]
        sq, skv = vis.shape
        i = torch.arange(skv - sq, skv)[:, None]
        j = torch.arange(skv)[None, :]
        causal = j <= i
        if bool((vis & ~causal).any()):
            return "mask lets a query see later keys (not causal)"
        found: dict = {}
        if not bool((vis == causal).all()):
            for var in variants():
                if var.mask_form is not None:
                    value = var.mask_form(vis, causal)
                    if value is not None:
                        found[var.param.name] = value
                        break
            else:
                return "mask is causal but not a pattern any registered variant explains"
        if bias is not None and bool((bias.masked_fill(~allowed, 0) != 0).any()):
            for var in variants():
                if var.bias_form is not None:
                    value = var.bias_form(bias.masked_fill(~allowed, 0), vis, num_heads)
                    if value is not None:
                        found[var.param.name] = value
                        break
            else:
                return "scores carry an additive bias no registered variant explains"
        seen.append(found)
    first = seen[0]
    for other in seen[1:]:
        if set(other) != set(first) or any(
                not _same(first[k], other[k]) for k in first):
            return f"mask/bias looks different at different probe sizes: {seen}"
    return first


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    return a == b


def _as_heads(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[..., Sq, Skv]`` -> ``[Hb, Sq, Skv]`` (batch is 1 in a probe, so leading dims are heads)."""
    return x.reshape(-1, *x.shape[-2:])


# ---------------------------------------------------------------------------------------------------------
# eager chains


def _skip_casts(x):
    while is_op(x, *_CASTS):
        x = x.args[0]
    return x


def _find_root(x: fx.Node, depth: int = 24) -> Optional[fx.Node]:
    """The nearest q.k^T node above the softmax input (breadth first, not crossing another softmax)."""
    frontier, seen = [x], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if is_op(n, *_QK):
                return n
            if is_op(n, aten.softmax, aten._softmax):
                continue
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _chain(root: fx.Node, top: fx.Node) -> set[fx.Node]:
    """Nodes on some path from ``root`` (exclusive) to ``top`` (inclusive)."""
    order = {n: i for i, n in enumerate(top.graph.nodes)}
    lo, hi = order.get(root, -1), order.get(top, -1)
    below, stack = set(), [top]
    while stack:
        n = stack.pop()
        if n in below or order.get(n, -1) < lo:
            continue
        below.add(n)
        stack.extend(n.all_input_nodes)
    above, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in above or order.get(n, hi + 1) > hi:
            continue
        above.add(n)
        stack.extend(n.users)
    return (below & above) - {root}


def _qkv_4d(x: fx.Node) -> Optional[fx.Node]:
    """A 4-D ``[B, H, S, D]`` view of a matmul operand: itself, or the 4-D source of a heads-flattening reshape."""
    v = val(x)
    if v is not None and v.dim() == 4:
        return x
    if v is not None and v.dim() == 3 and is_op(x, *_VIEWS):
        src = x.args[0]
        vs = val(src)
        if vs is not None and vs.dim() == 4 and str(vs.shape[-1]) == str(v.shape[-1]):
            return src
    return None


def _key_operand(graph: fx.Graph, kt: fx.Node, before: fx.Node) -> Union[fx.Node, str]:
    """``k`` ``[B, H, S, D]`` from the transposed-key operand (taken from a last-two-dims transpose, else a new
    transpose node)."""
    if is_op(kt, aten.transpose) and {d % (val(kt).dim()) for d in kt.args[1:3]} == {val(kt).dim() - 2,
                                                                                       val(kt).dim() - 1}:
        k = _qkv_4d(kt.args[0])
        if k is not None:
            return k
    if val(kt) is not None and val(kt).dim() == 4:
        with graph.inserting_before(before):
            new = graph.call_function(aten.transpose.int, (kt, -2, -1))
        new.meta["val"] = val(kt).transpose(-2, -1)
        return new
    return "second matmul operand is not a (recoverable) transposed key"


def _probs_to_pv(softmax: fx.Node, strip_probs: bool) -> Union[tuple[fx.Node, set], str]:
    """Follow the probabilities through casts, eval-mode dropout, head views and (for sinks) the slice that
    drops the extra column, to the one ``probs @ v`` node."""
    out, passed, sliced = softmax, set(), False
    while len(out.users) == 1:
        user = next(iter(out.users))
        if is_op(user, *_CASTS):
            out = user
        elif is_op(user, *_VIEWS) and _keeps_rows(out, user):
            out = user
        elif is_op(user, aten.dropout) and not arg(user, 2, "train", False):
            out = user
        elif strip_probs and not sliced and is_op(user, aten.slice) and user.args[1] in (-1, 3) \
                and arg(user, 2, "start", 0) in (0, None) and arg(user, 3, "end", None) == -1:
            out, sliced = user, True
        else:
            break
        passed.add(out)
    if strip_probs and not sliced:
        return "sink column is not sliced off the probabilities"
    pv = next(iter(out.users)) if len(out.users) == 1 else None
    if not is_op(pv, aten.matmul, aten.bmm) or pv.args[0] is not out:
        return "softmax output does not feed a single probs @ v matmul"
    return pv, passed


def _keeps_rows(a: fx.Node, b: fx.Node) -> bool:
    """A view between softmax and ``probs @ v`` may only split or merge the leading (batch, head) dims."""
    va, vb = val(a), val(b)
    return va is not None and vb is not None and [str(d) for d in va.shape[-2:]] == [str(d) for d in vb.shape[-2:]]


def _strip_max_shift(x: fx.Node) -> fx.Node:
    """``x - max(x, -1, keepdim)`` -> ``x`` (a softmax does not see a per-row shift)."""
    if is_op(x, aten.sub):
        m = x.args[1]
        if is_op(m, aten.amax) and m.args[0] is x.args[0]:
            return x.args[0]
        if is_op(m, operator.getitem) and is_op(m.args[0], aten.max) and m.args[0].args[0] is x.args[0]:
            return x.args[0]
    return x


def _affine(probe: ScoreProbe, expr: fx.Node, cut: fx.Node, size: int):
    """Prove ``expr = coef * cut + bias`` on a probe; returns (coef, bias, masked) as ``[Hb, Sq, Skv]``."""
    g = torch.Generator().manual_seed(size)
    # float64 probes (promotion carries them through the chain) with magnitudes in [1, 2]: the coefficient
    # (e1 - e0) / r1 is then exact to well below any tolerance, even next to a large bias
    shape, device = probe._concrete(val(cut).shape, size), _device(probe.gm)
    dtype = torch.float64
    r1, r2 = ((torch.rand(shape, generator=g, dtype=dtype) + 1) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)
              for _ in range(2))
    values = (lambda *_: torch.zeros(shape, dtype=dtype, device=device), lambda *_: r1.to(device),
              lambda *_: r2.to(device))
    (e0, e1, e2), _ = probe.evaluate(expr, size, cut, values)
    e0, e1, e2 = (_as_heads(e.double().cpu(), size) for e in (e0, e1, e2))
    if r1.numel() != e0.numel():
        raise ValueError(f"score shape {tuple(e0.shape)} does not match q.k^T shape {tuple(shape)}")
    r1, r2 = (r.double().reshape(e0.shape) for r in (r1, r2))
    masked = e0 <= MASKED
    coef = torch.where(masked, torch.zeros_like(e0), (e1 - e0) / r1)
    pred = e0 + coef * r2
    scale = 1 + float(e0.masked_fill(masked, 0).abs().amax()) + 2 * float(coef.abs().amax())
    tol = (1e-5 if val(cut).dtype == torch.float32 else 2e-2) * scale
    if not bool(((pred - e2).abs().masked_fill(masked, 0) <= tol).all()):
        raise ValueError("the score expression is not affine in q.k^T")
    return coef, e0, masked


def _prove_chain(probe: ScoreProbe, top: fx.Node, root: fx.Node, softcap: Optional[tuple], num_heads: int):
    """Variant parameters and the scale of the affine score chain ``top(root)`` (softcap: ``(value, node,
    inner)``, proven separately: the part below it must be a pure scale)."""
    result: dict = {}

    def evaluate(size):
        if softcap is None:
            coef, bias, masked = _affine(probe, top, root, size)
        else:
            coef, bias, masked = _affine(probe, top, softcap[1], size)
            if bool((coef.masked_fill(masked, 1) - 1).abs().max() > 1e-6):
                raise ValueError("scores are rescaled after the softcap")
            inner_coef, inner_bias, inner_masked = _affine(probe, softcap[2], root, size)
            if bool(inner_masked.any()) or bool(inner_bias.abs().max() > 1e-6):
                raise ValueError("scores are masked or biased inside the softcap")
            coef = inner_coef
        vis_coef = coef[~masked]
        if vis_coef.numel() == 0:
            raise ValueError("every score is masked")
        scale = float(vis_coef.mean())
        if scale <= 0 or float((vis_coef - scale).abs().max()) > 1e-4 * abs(scale):
            raise ValueError("scores are not scaled by one positive constant")
        if "scale" in result and abs(result["scale"] - scale) > 1e-6 * scale:
            raise ValueError("scale differs between probe sizes")
        result["scale"] = scale
        return ~masked, bias

    verdict = _verdict(probe, None, evaluate, num_heads, probe.sizes(top, root))
    if isinstance(verdict, str):
        return verdict
    return dict(verdict, scale=result["scale"])


def _match_eager(gm: fx.GraphModule, softmax: fx.Node, probe: ScoreProbe) -> Union[dict, str]:
    dim, out = arg(softmax, 1, "dim"), val(softmax)
    if out is None or not isinstance(dim, int) or dim % out.dim() != out.dim() - 1:
        return "softmax is not over the last dim"
    x = _strip_max_shift(_skip_casts(softmax.args[0]))
    params: dict = {}
    strip_probs = False
    for var in variants():
        for form in var.eager_forms:
            if form.softmax_input is not None:
                hit = form.softmax_input(gm, x)
                if hit is not None:
                    params[var.param.name], x = hit
                    strip_probs = strip_probs or form.strip_probs
    scores_top = x
    root = _find_root(scores_top)
    if root is None:
        return "no q @ k^T matmul at the root of the score chain"
    q, kt = (root.args[1], root.args[2]) if is_op(root, aten.baddbmm) else root.args[:2]
    chain = _chain(root, scores_top)
    softcap = None
    for n in chain:
        for var in variants():
            for form in var.eager_forms:
                hit = form.scores(gm, n) if form.scores is not None else None
                if hit is not None:
                    if softcap is not None:
                        return "two non-affine score modifiers in one chain"
                    softcap = (hit[0], n, hit[1], var.param.name)
    affine_nodes = chain - (_chain(root, softcap[1]) if softcap else set())
    inner_nodes = (_chain(root, softcap[2]) if softcap else set())
    for n in affine_nodes | inner_nodes:
        if not is_op(n, *_CHAIN_OPS):
            return f"score chain holds {n.target} ({n.name}), which is not an affine score op"
    found = _probs_to_pv(softmax, strip_probs)
    if isinstance(found, str):
        return found
    pv, _ = found
    output, consumed = pv, set()
    for var in variants():
        for form in var.eager_forms:
            if form.output is not None:
                hit = form.output(gm, pv, scores_top)
                if hit is not None:
                    params[var.param.name], output, consumed = hit
    head = _chain(scores_top, softmax.args[0]) | {scores_top, softmax.args[0]}
    allowed_users = chain | head | {softmax} | consumed
    for n in chain | {root}:
        extra = [u for u in n.users if u not in allowed_users]
        if extra:
            return f"scores {n.name} have other users ({', '.join(u.name for u in extra)}): not plain attention"
    q4, v4 = _qkv_4d(q), _qkv_4d(pv.args[1])
    if q4 is None or v4 is None:
        return "q/v heads cannot be recovered from the flattened matmul operands"
    k4 = _key_operand(gm.graph, kt, root)
    if isinstance(k4, str):
        return k4
    num_heads = int(val(q4).shape[1])
    proven = _prove_chain(probe, scores_top, root, softcap[:3] if softcap else None, num_heads)
    if isinstance(proven, str):
        return proven
    if softcap:
        proven[softcap[3]] = softcap[0]
    return {"q": q4, "k": k4, "v": v4, "output": output, "flat_output": val(output).dim() == 3,
            "scale": proven.pop("scale"), "params": {**params, **proven}}


# ---------------------------------------------------------------------------------------------------------
# SDPA


def _match_sdpa(gm: fx.GraphModule, node: fx.Node, probe: ScoreProbe) -> Union[dict, str]:
    q, k, v = node.args[:3]
    dropout = arg(node, 4, "dropout_p", 0.0)
    if dropout:
        return f"dropout_p={dropout} in inference graph"
    scale = arg(node, 6, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(val(q).shape[-1])
    mask = arg(node, 3, "attn_mask")
    is_causal = bool(arg(node, 5, "is_causal", False))
    if mask is None:
        if not is_causal:
            return "no mask and not is_causal: attention is bidirectional"
        params: Union[dict, str] = {}
    else:
        num_heads = int(val(q).shape[1])

        def evaluate(size):
            (out,), _ = probe.evaluate(mask, size)
            out = _as_heads(out, size)
            if out.dtype == torch.bool:
                return out, None
            masked = out <= MASKED
            return ~masked, out.double().masked_fill(masked, 0)

        params = _verdict(probe, mask, evaluate, num_heads, probe.sizes(mask))
        if isinstance(params, str):
            return params
    return {"q": q, "k": k, "v": v, "output": node, "flat_output": False, "scale": float(scale),
            "params": dict(params)}


# ---------------------------------------------------------------------------------------------------------


def _param_node(gm: fx.GraphModule, value: Any, before: fx.Node, name: str, index: int, num_heads: int):
    """A graph value for a variant parameter: scalars as they are; a tensor found by probing becomes a graph
    constant; a graph node (e.g. a sinks parameter) is flattened to ``[Hq]``."""
    if isinstance(value, torch.Tensor):
        attr = f"_variant_{name}_{index}"
        gm.register_buffer(attr, value.to(_device(gm)))
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(attr)
        node.meta["val"] = value
        return node
    if isinstance(value, fx.Node):
        v = val(value)
        if v is None or v.numel() != num_heads:
            raise ValueError(f"{name} is not one value per query head (shape {None if v is None else v.shape})")
        with gm.graph.inserting_before(before):
            return gm.graph.call_function(aten.reshape.default, (value, [-1]))
    return value


@register_pass("match_attention")
def match_attention(gm: fx.GraphModule, ctx) -> PassResult:
    probe = ScoreProbe(gm, ctx.max_seq_len)
    result = PassResult()
    for node in list(gm.graph.nodes):
        if is_op(node, aten.scaled_dot_product_attention):
            m = _match_sdpa(gm, node, probe)
        elif is_op(node, aten.softmax, aten._softmax):
            if val(node) is not None and val(node).dim() < 3:
                continue  # e.g. an MoE router: token-wise, never attention scores
            m = _match_eager(gm, node, probe)
        else:
            continue
        if isinstance(m, dict):
            try:
                m = _rewrite(gm, m, result.num_matches)
            except ValueError as exc:
                m = str(exc)
        if isinstance(m, str):
            result.notes.append(f"left alone {node.name}: {m}")
            ctx.unmatched_attention.append((node.name, m))
            continue
        result.num_matches += 1
        result.notes.append(f"{node.name}: {', '.join(m) or 'plain causal'}")
    return result


def _rewrite(gm: fx.GraphModule, m: dict, index: int) -> list[str]:
    out = m["output"]
    num_heads = int(val(m["q"]).shape[1])
    kwargs = {name: _param_node(gm, value, out, name, index, num_heads) for name, value in m["params"].items()}
    with gm.graph.inserting_before(out):
        new = gm.graph.call_function(torch.ops.autodeploy.attention.default,
                                     (m["q"], m["k"], m["v"], float(m["scale"]), True), kwargs)
        vq, vv = val(m["q"]), val(m["v"])
        if vq is not None and vv is not None:
            new.meta["val"] = vq.new_empty((*vq.shape[:-1], vv.shape[-1]))
        result = new
        if m["flat_output"]:
            result = gm.graph.call_function(aten.flatten.using_ints, (new, 0, 1))
    result.meta.update({k: v for k, v in out.meta.items() if k != "val"})
    if "val" in out.meta:
        result.meta["val"] = out.meta["val"]
    for key in ("nn_module_stack", "stack_trace"):
        if key in out.meta:
            new.meta[key] = out.meta[key]
    out.replace_all_uses_with(result)
    return sorted(m["params"])
