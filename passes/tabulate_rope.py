"""Replace the RoPE cos/sin computation with one lookup in a table of every position the model can see.

HF models derive cos/sin from ``position_ids`` on every forward: a cast, a product with ``inv_freq`` (a matmul
in some versions), a concat, cos, sin, the attention scaling and two casts. On a Llama-1B batch-1 decode step
that is ~10 kernels ahead of the first layer (~15 us on an H100 inside the CUDA graph, per
``benchmarks/diag_decode_step.py``). What they compute depends on the position alone, so this pass evaluates
that subgraph once, at compile time, for positions ``0 .. max_seq_len - 1``, with the graph's own ops on the
model's device (the table holds exactly the values the forward would compute), and the forward gathers rows
of ``[max_seq_len, 2R]`` (cos then sin) with one ``embedding`` kernel; cos and sin are views of the result.

The subgraph qualifies only if its one graph input is ``position_ids`` and it is position-wise: its outputs are
``position_ids.shape + (R,)`` and rows computed for a few scattered positions on their own equal the table's
rows exactly (a computation that mixes positions, e.g. a dynamic scaling by the longest one, fails that and
is left as it was). The packer rejects positions past ``max_seq_len`` (``metadata.nest_sequences``).
"""

from __future__ import annotations

import torch
from torch import fx

from autodeploy.graph.utils import ancestors, aten, is_op, remove_dead_code, subgraph_module, val
from autodeploy.graph.passes import PassResult, register_pass

TABLE_NAME = "rope_cos_sin_table"


def _rope_inputs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """Distinct (cos, sin) pairs feeding the canonical RoPE ops, in graph order."""
    pairs: list[tuple[fx.Node, fx.Node]] = []
    for node in gm.graph.nodes:
        if is_op(node, torch.ops.autodeploy.rope) and (node.args[2], node.args[3]) not in pairs:
            pairs.append((node.args[2], node.args[3]))
    return pairs


def _position_subgraph(gm: fx.GraphModule, outs: tuple[fx.Node, fx.Node]) -> tuple[fx.GraphModule, fx.Node] | str:
    """A GraphModule ``positions -> (cos, sin)`` and the position placeholder, or why there is none."""
    needed = ancestors(outs)
    inputs = [n for n in needed if n.op == "placeholder"]
    if [n.target for n in inputs] != ["position_ids"]:
        return f"cos/sin depend on {sorted(str(n.target) for n in inputs)}, not on position_ids alone"
    if any(n.op not in ("placeholder", "get_attr", "call_function") for n in needed):
        return "cos/sin subgraph calls modules or methods"
    return subgraph_module(gm, outs), inputs[0]


def _tabulate(sub: fx.GraphModule, positions: fx.Node, outs: tuple[fx.Node, fx.Node], num_positions: int,
              device: torch.device) -> torch.Tensor | str:
    """``[num_positions, 2R]`` rows ``cat(cos, sin)``, checked position-wise, or why the subgraph fails."""
    pv, cv = val(positions), val(outs[0])
    if pv is None or cv is None or pv.dim() != 2 or cv.dim() != 3:
        return "cos/sin are not [B, T, R] over [B, T] positions"
    dtype = pv.dtype
    with torch.inference_mode():
        def run(pos: torch.Tensor) -> torch.Tensor | str:
            cos, sin = sub(pos.view(1, -1))
            if cos.shape != (1, pos.numel(), cv.shape[-1]) or sin.shape != cos.shape or cos.dtype != cv.dtype:
                return f"cos/sin came out {tuple(cos.shape)} {cos.dtype}, not one row per position"
            return torch.cat([cos[0], sin[0]], dim=-1)

        table = run(torch.arange(num_positions, dtype=dtype, device=device))
        if isinstance(table, str):
            return table
        # scattered positions on their own, none of the batches holding both ends of the table, so a dependence
        # on the batch's longest or shortest position shows up too
        for probe in ((num_positions // 2, 3 % num_positions, 1 % num_positions), (num_positions - 1,), (0,)):
            idx = torch.tensor(probe, dtype=dtype, device=device)
            rows = run(idx)
            if isinstance(rows, str) or not torch.equal(rows, table[idx]):
                return "cos/sin of a position depend on the other positions in the batch"
    return table.contiguous()


def _fake_rows(like: fx.Node, table: torch.Tensor, positions: fx.Node) -> tuple[object, object]:
    """Fake values (the new nodes' meta) of the table and of its gathered rows, in ``like``'s fake mode."""
    mode = getattr(val(like), "fake_mode", None)
    if mode is None:
        return None, None
    with mode:
        fake_table = mode.from_tensor(table, static_shapes=True)
        return fake_table, torch.ops.aten.embedding(fake_table, val(positions))


def _replace(gm: fx.GraphModule, outs: tuple[fx.Node, fx.Node], positions: fx.Node, table: torch.Tensor,
             name: str) -> None:
    """Point every user of ``outs`` at views of ``embedding(table, positions)``."""
    rot = table.shape[-1] // 2
    gm.register_buffer(name, table)
    # right after the graph inputs: between two kernels of a layer this plain torch kernel would break the
    # programmatic-dependent-launch overlap of the qkv GEMM with the attention kernel (measured ~2 us per step)
    first_op = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(first_op):
        table_node = gm.graph.get_attr(name)
        rows = gm.graph.call_function(aten.embedding.default, (table_node, positions))
        cos = gm.graph.call_function(aten.slice.Tensor, (rows, -1, 0, rot))
        sin = gm.graph.call_function(aten.slice.Tensor, (rows, -1, rot, 2 * rot))
    table_node.meta["val"], rows.meta["val"] = _fake_rows(outs[0], table, positions)
    if rows.meta["val"] is not None:
        cos.meta["val"] = rows.meta["val"][..., :rot]
        sin.meta["val"] = rows.meta["val"][..., rot:]
    outs[0].replace_all_uses_with(cos)
    outs[1].replace_all_uses_with(sin)


@register_pass("tabulate_rope")
def tabulate_rope(gm: fx.GraphModule, ctx) -> PassResult:
    result = PassResult()
    pairs = _rope_inputs(gm)
    if not pairs:
        result.notes.append("no RoPE ops")
    for i, outs in enumerate(pairs):
        built = _position_subgraph(gm, outs)
        if isinstance(built, str):
            table = built
        else:
            sub, positions = built
            try:
                table = _tabulate(sub, positions, outs, ctx.max_seq_len, ctx.device)
            except Exception as exc:  # report, never break the compile
                table = f"evaluating cos/sin failed ({type(exc).__name__}: {exc})"
        if isinstance(table, str):
            result.notes.append(f"{outs[0].name}/{outs[1].name}: {table}; left as computed")
            continue
        _replace(gm, outs, positions, table, f"{TABLE_NAME}_{i}")
        result.num_matches += 1
        mib = table.numel() * table.element_size() / 2**20
        result.notes.append(f"cos/sin gathered from a {list(table.shape)} table ({mib:.1f} MiB)")
    if result.num_matches:
        remove_dead_code(gm)
        gm.recompile()
    return result
