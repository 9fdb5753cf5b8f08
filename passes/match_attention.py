"""Match both attention forms HF emits and replace them with ``autodeploy::attention``.

* ``aten.scaled_dot_product_attention(q, k, v, mask, ..., is_causal, scale, enable_gqa)``
* the eager chain ``matmul(q, k^T) -> scale -> [softcap: /c, tanh, *c] -> + mask -> softmax -> [cast]
  -> [dropout] -> matmul(., v)``

Scale and softcap are read from the graph's constants. Causality and the sliding window are **proven** from
the mask: the subgraph that builds the mask is extracted and evaluated on probe sequences, and the result
must equal a causal band exactly. A pattern that cannot be proven causal is left alone and reported.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import fx

from autodeploy.graph.utils import aten, ancestors, arg, is_op, scalar_constant, subgraph_module, val
from autodeploy.graph.passes import PassResult, register_pass

_CASTS = (aten.to, aten._to_copy, aten.type_as)


class MaskAnalyser:
    """Proves what a mask node encodes by evaluating its subgraph on probe inputs (memoised per node)."""

    def __init__(self, gm: fx.GraphModule, max_seq_len: int):
        self.gm = gm
        self.limit = max(2, int(max_seq_len))
        self._memo: dict[fx.Node, Union[tuple[bool, Optional[int]], str]] = {}

    def analyse(self, mask: fx.Node) -> Union[tuple[bool, Optional[int]], str]:
        if mask not in self._memo:
            try:
                self._memo[mask] = self._analyse(mask)
            except Exception as exc:  # report, never crash the compile
                self._memo[mask] = f"mask could not be evaluated ({type(exc).__name__}: {exc})"
        return self._memo[mask]

    def _window_candidates(self, mask: fx.Node) -> list[int]:
        cands = set()
        for node in ancestors([mask]):
            for a in list(node.args) + list(node.kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and 1 < a < self.limit:
                    cands.add(a)
        return sorted(cands)

    def _analyse(self, mask: fx.Node) -> Union[tuple[bool, Optional[int]], str]:
        sub = subgraph_module(self.gm, mask)
        cands = self._window_candidates(mask)
        sizes = sorted({min(self.limit, 37), min(self.limit, max(64, (cands[-1] + 2) if cands else 64))})
        verdicts = set()
        for size in sizes:
            verdict = self._probe(sub, size)
            if isinstance(verdict, str):
                return verdict
            verdicts.add(verdict)
        windows = {w for _, w in verdicts if w is not None}
        if len(windows) > 1:
            return f"mask looks like different windows at different sizes: {sorted(windows)}"
        return True, (windows.pop() if windows else None)

    def _probe(self, sub: fx.GraphModule, size: int) -> Union[tuple[bool, Optional[int]], str]:
        inputs = []
        for node in sub.graph.nodes:
            if node.op != "placeholder":
                continue
            if node.target == "input_ids":
                inputs.append(torch.zeros(1, size, dtype=torch.long, device=self._device()))
            elif node.target == "position_ids":
                inputs.append(torch.arange(size, device=self._device())[None])
            else:
                return f"mask depends on graph input {node.target!r}"
        with torch.no_grad():
            out = sub(*inputs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dtype == torch.bool:
            allowed = out
        else:
            floor = torch.finfo(out.dtype).min / 2
            if not bool(((out == 0) | (out <= floor)).all()):
                return "additive mask carries biases, not just visibility"
            allowed = out == 0
        allowed = allowed.reshape(-1, *allowed.shape[-2:])
        if not bool((allowed == allowed[:1]).all()):
            return "mask differs across batch/heads"
        allowed = allowed[0].cpu()
        sq, skv = allowed.shape
        i = torch.arange(skv - sq, skv)[:, None]
        j = torch.arange(skv)[None, :]
        causal = j <= i
        if bool((allowed & ~causal).any()):
            return "mask lets a query see later keys (not causal)"
        widest = int(allowed.sum(-1).max())
        window = None if widest >= skv else widest
        expected = causal & ((i - j) < window) if window else causal
        if not bool((allowed == expected).all()):
            return "mask is causal but not a plain sliding-window band"
        return True, window

    def _device(self) -> torch.device:
        for p in self.gm.parameters():
            return p.device
        for b in self.gm.buffers():
            return b.device
        return torch.device("cpu")


def _scores_chain(gm: fx.GraphModule, x: fx.Node) -> Union[dict, str]:
    """Walk back from the softmax input: [+mask] <- [softcap] <- [scale] <- matmul(q, k^T)."""
    info: dict = {"mask": None, "softcap": None, "scale": 1.0}
    if is_op(x, aten.add):
        a, b = x.args[0], x.args[1]
        for scores, mask in ((a, b), (b, a)):
            if isinstance(scores, fx.Node) and _reaches_matmul(scores):
                info["mask"], x = mask, scores
                break
        else:
            return "softmax input is an add without a q.k^T operand"
    x = _skip_casts(x)
    if is_op(x, aten.mul) and is_op(_skip_casts(x.args[0]), aten.tanh):
        cap = scalar_constant(gm, x.args[1])
        inner = _skip_casts(x.args[0]).args[0]
        if cap is None or not is_op(inner, aten.div) or scalar_constant(gm, inner.args[1]) != cap:
            return "tanh in the score chain is not a softcap c * tanh(s / c)"
        info["softcap"], x = cap, _skip_casts(inner.args[0])
    if is_op(x, aten.mul, aten.div):
        c = scalar_constant(gm, x.args[1])
        if c is None:
            c, other = scalar_constant(gm, x.args[0]), x.args[1]
        else:
            other = x.args[0]
        if c is None:
            return "scores are scaled by a non-constant"
        info["scale"] = c if is_op(x, aten.mul) else 1.0 / c
        x = _skip_casts(other)
    if not is_op(x, aten.matmul, aten.bmm):
        return "no q @ k^T matmul at the root of the score chain"
    q, kt = x.args
    if not is_op(kt, aten.transpose, aten.permute, aten.t):
        return "second matmul operand is not a transposed key"
    info["q"], info["k"] = q, kt.args[0]
    if is_op(kt, aten.transpose):
        dims = {d % 4 for d in kt.args[1:3]}
        if dims != {2, 3}:
            return f"key transposed over dims {kt.args[1:3]}, expected the last two"
    elif is_op(kt, aten.permute) and list(kt.args[1])[-2:] not in ([3, 2], [-1, -2]):
        return "key permutation is not a last-two-dims transpose"
    return info


def _skip_casts(x):
    while is_op(x, *_CASTS):
        x = x.args[0]
    return x


def _reaches_matmul(x: fx.Node, depth: int = 8) -> bool:
    for _ in range(depth):
        if is_op(x, aten.matmul, aten.bmm):
            return True
        if not isinstance(x, fx.Node) or x.op != "call_function" or not x.args:
            return False
        x = x.args[0]
    return False


def _match_eager(gm: fx.GraphModule, softmax: fx.Node, masks: MaskAnalyser):
    dim = arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        return "softmax is not over the last dim"
    chain = _scores_chain(gm, softmax.args[0])
    if isinstance(chain, str):
        return chain
    out = softmax
    while len(out.users) == 1:
        user = next(iter(out.users))
        if is_op(user, *_CASTS):
            out = user
        elif is_op(user, aten.dropout) and not arg(user, 2, "train", False):
            out = user
        else:
            break
    pv = next(iter(out.users)) if len(out.users) == 1 else None
    if not is_op(pv, aten.matmul, aten.bmm) or pv.args[0] is not out:
        return "softmax output does not feed a single probs @ v matmul"
    return dict(chain, v=pv.args[1], output=pv)


def _match_sdpa(gm: fx.GraphModule, node: fx.Node):
    q, k, v = node.args[:3]
    dropout = arg(node, 4, "dropout_p", 0.0)
    if dropout:
        return f"dropout_p={dropout} in inference graph"
    scale = arg(node, 6, "scale", None)
    if scale is None:
        scale = 1.0 / math.sqrt(val(q).shape[-1])
    return {"q": q, "k": k, "v": v, "mask": arg(node, 3, "attn_mask"), "scale": float(scale), "softcap": None,
            "is_causal": bool(arg(node, 5, "is_causal", False)), "output": node}


@register_pass("match_attention")
def match_attention(gm: fx.GraphModule, ctx) -> PassResult:
    masks = MaskAnalyser(gm, ctx.max_seq_len)
    result = PassResult()
    for node in list(gm.graph.nodes):
        if is_op(node, aten.scaled_dot_product_attention):
            m = _match_sdpa(gm, node)
        elif is_op(node, aten.softmax, aten._softmax):
            m = _match_eager(gm, node, masks)
        else:
            continue
        if isinstance(m, dict):
            m = _resolve_mask(m, masks)
        if isinstance(m, str):
            result.notes.append(f"left alone {node.name}: {m}")
            ctx.unmatched_attention.append((node.name, m))
            continue
        out = m["output"]
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(
                torch.ops.autodeploy.attention.default,
                (m["q"], m["k"], m["v"], float(m["scale"]), True, m["window"], m["softcap"], None),
            )
        new.meta = dict(out.meta)
        out.replace_all_uses_with(new)
        result.num_matches += 1
    return result


def _resolve_mask(m: dict, masks: MaskAnalyser) -> Union[dict, str]:
    if m["mask"] is None:
        if m.get("is_causal"):
            return dict(m, window=None)
        return "no mask and not is_causal: attention is bidirectional"
    verdict = masks.analyse(m["mask"])
    if isinstance(verdict, str):
        return verdict
    return dict(m, window=verdict[1])
