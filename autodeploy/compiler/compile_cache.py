"""On-disk cache of compiled graphs, so a second start skips export and the passes.

An entry holds the final cached GraphModule *without weights* (every parameter/buffer replaced by a meta
tensor) plus what the runtime needs to know (backend, attention specs, cache inputs, page size). On a hit the
graph is re-bound to the caller's model tensors by name, so one entry serves any weights of the same
architecture. A tensor a pass derived from model tensors (``fuse_gemms``'s concatenated weights: its get_attr
node carries ``meta[DERIVED_META] = ("cat", [source targets], dim)``) is stored as that recipe and rebuilt from
the caller's tensors on load, so an entry never holds a copy of the weights. The key covers the model class
and config, dtype, device type, compile options, library versions and a hash of autodeploy's own sources (a
code change invalidates every entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx

from autodeploy.graph.utils import DERIVED_META, concat_shared, getattr_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
_SOURCE_HASH: Optional[str] = None


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTODEPLOY_CACHE_DIR", Path.home() / ".cache" / "autodeploy"))


def _source_hash() -> str:
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        roots = [Path(__file__).resolve().parents[1]]  # the autodeploy package
        for sub in ("passes", "backends", "models"):
            mod = __import__(f"autodeploy.{sub}", fromlist=["_"])
            roots += [Path(p) for p in mod.__path__]
        for root in roots:
            for f in sorted(root.rglob("*.py")):
                h.update(f.read_bytes())
        _SOURCE_HASH = h.hexdigest()[:16]
    return _SOURCE_HASH


def cache_key(model: torch.nn.Module, options: dict) -> str:
    import transformers

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    payload = {
        "format": FORMAT_VERSION, "class": type(model).__name__, "config": config,
        "attn": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype), "device": next(model.parameters()).device.type,
        "options": options, "torch": torch.__version__, "transformers": transformers.__version__,
        "source": _source_hash(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _model_tensor(model: torch.nn.Module, target: str) -> Optional[torch.Tensor]:
    """The model tensor a graph ``get_attr`` refers to (export names it ``m.<param path>``)."""
    if not target.startswith("m."):
        return None
    try:
        obj = getattr_path(model, target[2:])
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def _derived_recipe(node: fx.Node, model: torch.nn.Module) -> Optional[tuple]:
    """The recipe of a get_attr tensor derived from model tensors, if every source is one of ``model``'s."""
    recipe = node.meta.get(DERIVED_META)
    if not recipe or recipe[0] not in _DERIVE_OPS:
        return None
    if any(_model_tensor(model, src) is None for src in recipe[1]):
        return None
    return tuple(recipe)


# Recipe ops: name -> fn(source tensors, *params). ``cat`` re-points the sources at views of its result, as the
# pass did on the cold compile, so the warm-loaded graph and the model share one copy of the weights.
_DERIVE_OPS = {"cat": concat_shared}


def _rebuild(model: torch.nn.Module, recipe: tuple, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The derived tensor from ``model``'s tensors, or None if they do not produce one shaped like ``like``.
    Checked on meta tensors first: the real op re-points the model's parameters."""
    op, sources, *params = recipe
    tensors = [_model_tensor(model, src) for src in sources]
    if op not in _DERIVE_OPS or any(t is None for t in tensors):
        return None
    if op == "cat":
        try:
            probe = torch.cat([torch.empty_like(t, device="meta") for t in tensors], *params)
        except RuntimeError:
            return None
        if probe.shape != like.shape or probe.dtype != like.dtype:
            return None
    return _DERIVE_OPS[op](tensors, *params)


def _set_attr(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, name, value)


def _module_tree(attrs: dict[str, Any]) -> torch.nn.Module:
    """A module hierarchy holding every tensor as a *registered buffer*: pickled GraphModules are rebuilt by
    re-tracing their code, and a plain tensor attribute would come back as an anonymous ``_tensor_constantN``
    (torch versions differ in how a dict root registers them)."""
    root = torch.nn.Module()
    for target, value in attrs.items():
        owner = root
        *path, name = target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, torch.Tensor):
            owner.register_buffer(name, value)
        else:
            setattr(owner, name, value)
    return root


@dataclasses.dataclass(frozen=True)
class _Ref:
    """A reference to an earlier node, by name, inside serialized arguments."""

    name: str


def _encode_target(target: Any) -> tuple:
    schema = getattr(target, "_schema", None)
    if schema is not None:  # an OpOverload: resolved by name, so op objects never need pickling
        ns, _, op = schema.name.partition("::")
        return ("op", ns, op, target._overloadname)
    if isinstance(target, str):
        return ("str", target)
    return ("py", target.__module__, target.__qualname__)


def _decode_target(enc: tuple) -> Any:
    kind = enc[0]
    if kind == "op":
        return getattr(getattr(getattr(torch.ops, enc[1]), enc[2]), enc[3])
    if kind == "str":
        return enc[1]
    import importlib

    obj: Any = importlib.import_module(enc[1])
    for part in enc[2].split("."):
        obj = getattr(obj, part)
    return obj


def _serialize_graph(graph: fx.Graph) -> list:
    """The node list with targets by name: rebuilt directly on load. FX's own GraphModule pickling re-traces
    the generated code, which on some torch versions turns weights into anonymous constants."""
    to_ref = lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a  # noqa: E731
    return [(n.op, n.name, _encode_target(n.target), fx.node.map_aggregate(n.args, to_ref),
             fx.node.map_aggregate(n.kwargs, to_ref)) for n in graph.nodes]


def _deserialize_graph(nodes: list) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in nodes:
        resolve = lambda a: env[a.name] if isinstance(a, _Ref) else a  # noqa: E731
        args, kwargs = fx.node.map_aggregate(args, resolve), fx.node.map_aggregate(kwargs, resolve)
        if op == "output":
            graph.output(args[0])
            continue
        env[name] = graph.create_node(op, _decode_target(target), args, kwargs, name=name)
    return graph


def save(path: Path, gm: fx.GraphModule, model: torch.nn.Module, ctx: Any) -> None:
    """Write ``gm`` with model tensors swapped for meta tensors (graph-only constants are kept)."""
    attrs: dict[str, Any] = {}
    bound: list[str] = []  # targets re-bound to the caller's model on load
    derived: dict[str, tuple] = {}  # targets rebuilt from the caller's model tensors on load
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr_path(gm, node.target)
        recipe = _derived_recipe(node, model) if isinstance(value, torch.Tensor) else None
        if isinstance(value, torch.Tensor) and _model_tensor(model, node.target) is not None:
            value = torch.empty_like(value, device="meta")
            bound.append(node.target)
        elif recipe is not None:
            value = torch.empty_like(value, device="meta")
            derived[node.target] = recipe
        elif isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.detach().cpu()
        attrs[node.target] = value
    if any(not isinstance(v, torch.Tensor) for v in attrs.values()):
        log.info("graph holds submodules; not cached")
        return
    state = {
        "format": FORMAT_VERSION, "nodes": _serialize_graph(gm.graph), "attrs": attrs, "bound": bound,
        "derived": derived,
        "backend": ctx.attention_backend.name,
        "specs": [dataclasses.asdict(s) for s in ctx.attention_specs],
        "cache_input_names": ctx.cache_input_names, "page_size": ctx.page_size,
        "passes": [dataclasses.asdict(p) for p in ctx.report.passes],
        "backend_reason": ctx.report.backend_reason, "rejected": ctx.report.rejected_backends,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    log.info("saved compiled graph to %s", path)


def load(path: Path, model: torch.nn.Module) -> Optional[dict]:
    """Load an entry and bind it to ``model``'s tensors; None if absent or not bindable."""
    if not path.exists():
        return None
    from autodeploy.backends import get_backend

    try:
        state = torch.load(path, weights_only=False)
        backend = get_backend(state["backend"])
        backend.cached_attention_op()  # imports the backend's ops before the graph code runs
        gm = fx.GraphModule(_module_tree(state["attrs"]), _deserialize_graph(state["nodes"]))
        device = next(model.parameters()).device
        bound, derived = set(state["bound"]), state["derived"]
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target in derived:
                continue
            current = getattr_path(gm, node.target)
            if not isinstance(current, torch.Tensor):
                continue
            if node.target not in bound and current.device.type == "meta":
                # Re-tracing the pickled code turned a weight into an anonymous constant (seen with torch 2.11):
                # this entry cannot be bound by name. Recompile rather than run on meta data.
                log.warning("compile cache entry %s has an unbindable constant %s; recompiling", path.name,
                            node.target)
                return None
            real = _model_tensor(model, node.target) if node.target in bound else current.to(device)
            if real is None or real.shape != current.shape or real.dtype != current.dtype:
                log.warning("compile cache entry %s does not fit this model (%s); recompiling", path.name,
                            node.target)
                return None
            _set_attr(gm, node.target, real)
        for target, recipe in derived.items():  # last: rebuilding re-points the model's parameters
            real = _rebuild(model, recipe, getattr_path(gm, target))
            if real is None:
                log.warning("compile cache entry %s: derived tensor %s does not fit this model; recompiling",
                            path.name, target)
                return None
            _set_attr(gm, target, real)
        gm.recompile()
        state["graph"] = gm
        state["backend_obj"] = backend
        return state
    except Exception as exc:  # a stale or corrupt entry must never break compile
        log.warning("compile cache entry %s unusable (%s: %s); recompiling", path, type(exc).__name__, exc)
        return None
