"""Turn each canonical stateful mixer op (autodeploy/ops/mixers/) into its cached op with a state slot per sequence.

Runs after ``insert_kv_cache`` (which chose the backend and added the step inputs). For every canonical mixer
node it adds one state input ``<kind>_state_<i>`` (laid out by the backend: ``allocate_state``), and the one
step input ``state_slots[B]`` (each packed sequence's slot, packed on the host with the other step inputs, read
by every stateful layer). The cached call is built by name from the kind's schema. A model without stateful
mixers is left unchanged. Backends that lower the whole graph to an engine (onnxruntime, tensorrt) carry no
recurrent state: a stateful model is refused for them.
"""

from __future__ import annotations

from torch import fx

from autodeploy.backends.base import StateSpec
from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.passes import PassResult, register_pass
from autodeploy.graph.utils import add_placeholder, placeholders
from autodeploy.ops.mixers import canonical_mixer_kind
from autodeploy.ops.mixers.base import STATE_STEP_TENSORS

STATE_SLOTS_INPUT = "state_slots"


@register_pass("insert_state_cache")
def insert_state_cache(gm: fx.GraphModule, ctx) -> PassResult:
    nodes = [(n, k) for n in gm.graph.nodes if (k := canonical_mixer_kind(n)) is not None]
    if not nodes:
        return PassResult(0, ["no stateful mixer"])
    backend = ctx.attention_backend
    if backend is None:
        raise UnsupportedModelError("insert_state_cache runs after insert_kv_cache (no backend chosen yet)")
    if getattr(backend, "engine_lowering", None) is not None:
        raise UnsupportedModelError(
            f"backend {backend.name!r} lowers the whole graph to an engine that carries no recurrent state; the "
            f"model's {len(nodes)} stateful mixer layer(s) need a backend with state slots (torch or triton)")
    inputs = placeholders(gm)
    for name in STATE_STEP_TENSORS:
        if name not in inputs:
            inputs[name] = add_placeholder(gm, name)
    specs, names = [], []
    for i, (node, kind) in enumerate(nodes):
        args = kind.inputs(node)
        missing = [n for n, v in args.items() if isinstance(v, fx.Node) and "val" not in v.meta]
        if missing:
            raise UnsupportedModelError(f"stateful mixer {node.name}: shapes of {missing} unknown")
        spec = StateSpec(layer=i, kind=kind.name, shape=kind.state_shape(args), dtype=kind.state_dtype(ctx.dtype))
        state = add_placeholder(gm, f"{kind.name}_state_{i}")
        call = {**args, "state": state, **{n: inputs[n] for n in STATE_STEP_TENSORS}}
        op = backend.cached_mixer_op(kind.name)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, tuple(call[n] for n in kind.cached_inputs))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        specs.append(spec)
        names.append(state.target)
    ctx.state_specs, ctx.state_input_names = specs, names
    kinds = sorted({s.kind for s in specs})
    return PassResult(len(specs), [f"{len(specs)} stateful layer(s) ({', '.join(kinds)}): one state slot per "
                                   f"sequence, read through the step input {STATE_SLOTS_INPUT!r}"])
