"""On-disk cache of compiled graphs, so a second start skips export and the passes.

An entry holds the final cached GraphModule *without weights* (every parameter/buffer replaced by a meta
tensor) plus what the runtime needs to know (backend, attention specs, cache inputs, page size). On a hit the
graph is re-bound to the caller's model tensors by name, so one entry serves any weights of the same
architecture. A tensor a pass derived from model tensors (``fuse_gemms``'s concatenated weights: its get_attr
node carries ``meta[DERIVED_META] = ("cat", [source targets], dim)``) is stored as that recipe and rebuilt from
the caller's tensors on load, so an entry never holds a copy of the weights.

The key covers the model class and config, dtype, device type, compile options (the pipeline with its options
among them), library versions, a hash of autodeploy's own sources and of every plugin package involved (the
backend's, any out-of-tree pass's): a code change invalidates every entry it could affect.

Format: one safetensors file. Graph-only tensors are its tensors; the structure (nodes with targets by name,
attribute shapes, specs, report) is JSON in its header metadata, next to a SHA-256 over the JSON and every
tensor's bytes, checked on load. Nothing on load executes code (no pickle): call targets resolve by name, op
overloads through ``torch.ops`` and Python callables only from an allow-list of modules. A mismatch, an
unreadable file or an unknown target is a warning and a recompile; an unwritable directory is a warning and the
compile goes on uncached. Writers go through a temp file in the same directory, fsync and ``os.replace``, so
concurrent compiles of one model never leave a torn entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import fx

from autodeploy.graph.utils import DERIVED_META, concat_shared, getattr_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 4
SUFFIX = ".safetensors"
_META_KEY, _HASH_KEY = "autodeploy", "sha256"
_SOURCE_HASH: Optional[str] = None
_PACKAGE_HASHES: dict[str, Optional[str]] = {}


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTODEPLOY_CACHE_DIR", Path.home() / ".cache" / "autodeploy"))


def _hash_tree(roots: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            h.update(str(f.relative_to(root.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _source_hash() -> str:
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        roots = [Path(__file__).resolve().parents[1]]  # the autodeploy package
        for sub in ("passes", "backends", "models"):
            mod = __import__(f"autodeploy.{sub}", fromlist=["_"])
            roots += [Path(p) for p in mod.__path__]
        _SOURCE_HASH = _hash_tree(roots)
    return _SOURCE_HASH


def code_hash(obj: Any) -> Optional[str]:
    """Hash of the source of the package that defines ``obj`` (a class, function or instance), or ``""`` for
    autodeploy itself (covered by the source hash). None when the code has no files to hash (defined
    interactively): such a compile is not cached, since a change could not be detected."""
    module_name = getattr(obj, "__module__", None) or type(obj).__module__
    top = module_name.split(".")[0]
    if top == "autodeploy":
        return ""
    if module_name in _PACKAGE_HASHES:
        return _PACKAGE_HASHES[module_name]
    digest: Optional[str] = None
    top_mod = sys.modules.get(top)
    try:
        if top_mod is not None and getattr(top_mod, "__path__", None):  # a package: every .py file in it
            digest = _hash_tree(Path(p) for p in top_mod.__path__)
        else:
            path = getattr(sys.modules.get(module_name), "__file__", None)
            if path and Path(path).is_file():
                digest = _hash_tree([Path(path)])
            else:
                source = inspect.getsource(obj if callable(obj) else type(obj))
                digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    except (OSError, TypeError):  # no readable source: the caller compiles uncached
        digest = None
    _PACKAGE_HASHES[module_name] = digest
    return digest


def cache_key(model: torch.nn.Module, options: dict, plugins: Optional[dict[str, str]] = None) -> str:
    """``plugins``: {plugin name: code_hash} of the out-of-tree code involved (backends, passes)."""
    import transformers

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    payload = {
        "format": FORMAT_VERSION, "class": type(model).__name__, "config": config,
        "attn": getattr(model.config, "_attn_implementation", None),
        "dtype": str(next(model.parameters()).dtype), "device": next(model.parameters()).device.type,
        "options": options, "torch": torch.__version__, "transformers": transformers.__version__,
        "source": _source_hash(), "plugins": dict(sorted((plugins or {}).items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def entry_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}{SUFFIX}"


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


def derive_ops() -> dict[str, Callable[..., torch.Tensor]]:
    """The registered recipe ops (name -> fn(source tensors, *params)); the tensor-parallel shard loader
    (``models.shard_loading``) replays the same recipes on the slices a rank reads."""
    return dict(_DERIVE_OPS)


def register_derive_ops(ops: dict[str, Callable[..., torch.Tensor]]) -> None:
    """Recipes (``meta["derived_from"] = (name, [source tensors], *params)``) that rebuild a pass's derived weights
    from the caller's model tensors on a cache hit, so an entry never stores them."""
    _DERIVE_OPS.update(ops)


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


class _Unserializable(Exception):
    """The graph holds something the JSON format cannot express: such a graph is not cached."""


class UntrustedEntry(Exception):
    """An entry names a callable outside the allow-list: refused, never imported."""


# Modules whose callables a stored graph may call (by qualified name). Op overloads resolve through torch.ops.
_ALLOWED_MODULES = ("_operator", "operator", "math", "torch", "autodeploy")


def _allowed_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _ALLOWED_MODULES)


def _encode_target(target: Any) -> list:
    schema = getattr(target, "_schema", None)
    if schema is not None:  # an OpOverload: resolved by name, so op objects never need pickling
        ns, _, op = schema.name.partition("::")
        return ["op", ns, op, target._overloadname]
    if isinstance(target, str):
        return ["str", target]
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not module or not qualname or "<" in qualname or not _allowed_module(module):
        raise _Unserializable(f"call target {target!r} is not in the allow-listed modules {_ALLOWED_MODULES}")
    return ["py", module, qualname]


def _decode_target(enc: list) -> Any:
    kind = enc[0]
    if kind == "op":
        return getattr(getattr(getattr(torch.ops, enc[1]), enc[2]), enc[3])
    if kind == "str":
        return enc[1]
    if kind != "py" or not _allowed_module(enc[1]):
        raise UntrustedEntry(f"entry names callable {enc!r} outside the allow-list {_ALLOWED_MODULES}")
    import importlib

    obj: Any = importlib.import_module(enc[1])
    for part in enc[2].split("."):
        obj = getattr(obj, part)
    return obj


_TORCH_ENUMS = {"dtype": torch.dtype, "memory_format": torch.memory_format, "layout": torch.layout}


def _encode(value: Any) -> Any:
    """A node argument (or spec/report field) as JSON; tagged objects for what JSON lacks."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, fx.Node):
        return {"$ref": value.name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):  # a plain JSON object
            return {k: _encode(v) for k, v in value.items()}
        return {"$dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    for tag, cls in _TORCH_ENUMS.items():
        if isinstance(value, cls):
            return {f"${tag}": str(value).replace("torch.", "")}
    raise _Unserializable(f"cannot store a {type(value).__name__} ({value!r})")


def _decode(value: Any, env: Optional[dict[str, fx.Node]] = None) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or not next(iter(value)).startswith("$"):
        return {k: _decode(v, env) for k, v in value.items()}
    (tag, body), = value.items()
    if tag == "$ref":
        if env is None or body not in env:
            raise ValueError(f"reference to unknown node {body!r}")
        return env[body]
    if tag == "$tuple":
        return tuple(_decode(v, env) for v in body)
    if tag == "$dict":
        return {_decode(k, env): _decode(v, env) for k, v in body}
    if tag == "$float":
        return float(body)
    if tag == "$slice":
        return slice(*(_decode(v, env) for v in body))
    if tag == "$device":
        return torch.device(body)
    if tag[1:] in _TORCH_ENUMS:
        obj = getattr(torch, body, None)
        if not isinstance(obj, _TORCH_ENUMS[tag[1:]]):
            raise ValueError(f"unknown torch {tag[1:]} {body!r}")
        return obj
    raise ValueError(f"unknown tag {tag!r}")


def _op_modules(graph: fx.Graph) -> list[str]:
    """Python modules that define the graph's custom ops (imported before the graph is rebuilt on load: e.g. a
    kernel provider's ops when another backend runs attention)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # private API moved: the backends' own imports still cover their attention ops
        return []
    mods = set()
    for node in graph.nodes:
        name = getattr(getattr(node.target, "_schema", None), "name", "")
        opdef = OPDEFS.get(name)
        fn = getattr(opdef, "_init_fn", None)
        if fn is not None and getattr(fn, "__module__", None):
            mods.add(fn.__module__)
    return sorted(mods)


def _import_op_modules(modules: list[str]) -> None:
    """Import the recorded op modules that are autodeploy's own or belong to a registered backend's package;
    any other name is refused (an entry never makes us import arbitrary code)."""
    import importlib

    from autodeploy.backends import get_backend, list_backends

    trusted = {type(get_backend(n)).__module__.split(".")[0] for n in list_backends()}
    for mod in modules:
        if not (_allowed_module(mod) or mod.split(".")[0] in trusted):
            raise UntrustedEntry(f"entry names op module {mod!r}, neither autodeploy's nor a registered backend's")
        importlib.import_module(mod)


def _serialize_graph(graph: fx.Graph) -> list:
    """The node list with targets by name: rebuilt directly on load (no re-tracing of generated code)."""
    return [[n.op, n.name, _encode_target(n.target), _encode(n.args), _encode(n.kwargs)] for n in graph.nodes]


def _deserialize_graph(nodes: list) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in nodes:
        args, kwargs = _decode(args, env), _decode(kwargs, env)
        if op == "output":
            graph.output(args[0])
            continue
        env[name] = graph.create_node(op, _decode_target(target), tuple(args), dict(kwargs), name=name)
    return graph


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _content_hash(structure: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the JSON structure and every stored tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(structure.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, then ``os.replace``: readers see the old entry or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save(path: Path, gm: fx.GraphModule, model: torch.nn.Module, ctx: Any, extra: Optional[dict] = None) -> bool:
    """Write ``gm`` with model tensors swapped for meta tensors (graph-only constants are kept). Returns whether
    an entry was written; a failure to write is a warning, never an error (the compile goes on uncached)."""
    from safetensors.torch import save as st_save

    attrs: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    bound: list[str] = []  # targets re-bound to the caller's model on load
    derived: dict[str, Any] = {}  # targets rebuilt from the caller's model tensors on load
    try:
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            value = getattr_path(gm, node.target)
            if not isinstance(value, torch.Tensor):
                log.info("graph holds submodules; not cached")
                return False
            recipe = _derived_recipe(node, model)
            desc = {"shape": list(value.shape), "dtype": _dtype_name(value.dtype)}
            if _model_tensor(model, node.target) is not None:
                bound.append(node.target)
            elif recipe is not None:
                derived[node.target] = recipe
            elif value.device.type != "meta":
                tensors[node.target] = value.detach().cpu().contiguous().clone()
                desc["stored"] = True
            attrs[node.target] = desc
        state = {
            "format": FORMAT_VERSION, "nodes": _serialize_graph(gm.graph), "op_modules": _op_modules(gm.graph),
            "attrs": attrs, "bound": bound,
            "derived": derived,
            "backend": ctx.attention_backend.name,
            "specs": [dataclasses.asdict(s) for s in ctx.attention_specs],
            "cache_input_names": ctx.cache_input_names, "page_size": ctx.page_size,
            "passes": [dataclasses.asdict(p) for p in ctx.report.passes],
            "backend_reason": ctx.report.backend_reason, "rejected": ctx.report.rejected_backends,
            "kernels": list(getattr(ctx.report, "kernels", [])),
            **(extra or {}),
        }
        structure = json.dumps(_encode(state), sort_keys=True)
    except _Unserializable as exc:
        log.info("compiled graph not cached: %s", exc)
        return False
    try:
        data = st_save(tensors, metadata={_META_KEY: structure, _HASH_KEY: _content_hash(structure, tensors)})
        _write_atomic(path, data)
    except Exception as exc:  # an unwritable or full cache directory must never fail the compile
        log.warning("compile cache: cannot write %s (%s: %s); continuing uncached", path, type(exc).__name__, exc)
        return False
    log.info("saved compiled graph to %s", path)
    return True


def read_entry(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse and verify an entry: (structure, stored tensors). Raises on any damage (hash mismatch included)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    structure, digest = meta.get(_META_KEY), meta.get(_HASH_KEY)
    if structure is None or digest is None:
        raise ValueError("not an autodeploy compile-cache entry (no structure or content hash)")
    if _content_hash(structure, tensors) != digest:
        raise ValueError("content hash mismatch (the file was modified or damaged)")
    state = _decode(json.loads(structure))
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {state.get('format')} != {FORMAT_VERSION}")
    return state, tensors


def load(path: Path, model: torch.nn.Module) -> Optional[dict]:
    """Load an entry and bind it to ``model``'s tensors; None if absent, damaged or not bindable."""
    if not path.exists():
        return None
    from autodeploy.backends import get_backend

    try:
        state, tensors = read_entry(path)
        backend = get_backend(state["backend"])
        backend.cached_attention_op()  # imports the backend's ops before the graph is rebuilt
        _import_op_modules(state.get("op_modules", []))
        attrs: dict[str, torch.Tensor] = {}
        for target, desc in state["attrs"].items():
            if desc.get("stored"):
                attrs[target] = tensors[target]
            else:
                attrs[target] = torch.empty(desc["shape"], dtype=getattr(torch, desc["dtype"]), device="meta")
        gm = fx.GraphModule(_module_tree(attrs), _deserialize_graph(state["nodes"]))
        device = next(model.parameters()).device
        bound, derived = set(state["bound"]), state["derived"]
        for node in gm.graph.nodes:
            if node.op != "get_attr" or node.target in derived:
                continue
            current = getattr_path(gm, node.target)
            if node.target not in bound and current.device.type == "meta":
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
            real = _rebuild(model, tuple(recipe), getattr_path(gm, target))
            if real is None:
                log.warning("compile cache entry %s: derived tensor %s does not fit this model; recompiling",
                            path.name, target)
                return None
            _set_attr(gm, target, real)
        gm.recompile()
        state["graph"] = gm
        state["backend_obj"] = backend
        return state
    except Exception as exc:  # a stale, damaged or untrusted entry must never break (or run code in) compile
        log.warning("compile cache entry %s unusable (%s: %s); recompiling", path, type(exc).__name__, exc)
        return None
