"""A tensor-parallel rank reads only its shard of a safetensors checkpoint.

Under ``compile(<checkpoint dir>, tensor_parallel_size=N)`` each rank builds the model on deferred weights
(``load_model(..., deferred_weights=True)``: fake parameters, no storage), exports it and runs the passes on
that. Then :func:`materialize` gives every tensor the graph reads its value, as a *recipe* resolved down to
checkpoint tensor names and slices:

* a model parameter is its checkpoint tensor(s), found through transformers' own key conversion for the
  architecture (renames; per-expert tensors merged with ``MergeModulelist`` and ``Concatenate``); a name that
  does not map, or a conversion step other than those, is refused naming the tensor (never guessed);
* a derived tensor is the recipe its pass recorded in ``meta[DERIVED_META]`` (the same recipes the compile
  cache replays): ``moe_view`` (slices/transposes of a stacked expert tensor), ``zeros``, and every op of the
  compile cache's registry (``cat`` of a fused GEMM, ``quantize``) applied to its resolved sources;
* a tensor the sharding pass cut (``gm.meta["tensor_parallel_plan"].weights``) is its recipe indexed by the
  cut's ranges.

Index selections are pushed down through views, stacks and concatenations to the checkpoint, where each
contiguous run is one ``safe_open(...).get_slice(name)[...]`` read; every byte returned is counted
(:class:`LoadStats`). Replicated tensors are read whole. Buffers computed at construction (RoPE's ``inv_freq``)
are real from the start; persistent buffers are read by :func:`load_buffers` when the model is built.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx

from autodeploy.errors import UnsupportedModelError
from autodeploy.graph.probe_weights import is_deferred
from autodeploy.graph.utils import DERIVED_META, getattr_path

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_MAX_RUNS = 64  # more contiguous runs than this along one dim: read their bounding box once, then index


class ShardLoadingError(UnsupportedModelError):
    """A graph tensor cannot be read from the checkpoint as its recipe says (the tensor is named)."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}


def config_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config declares (what ``from_pretrained(dtype="auto")`` picks), else fp32."""
    for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
        d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d.replace("torch.", ""), None)
        if isinstance(d, torch.dtype):
            return d
    return torch.float32


def unsupported_reason(model: Any) -> str:
    """Why ``model`` cannot be loaded shard by shard ('' when it can): it must be a local checkpoint directory
    with safetensors weights (an in-memory model already holds every weight)."""
    if isinstance(model, torch.nn.Module):
        return "an in-memory model (its weights are already materialised)"
    if not isinstance(model, (str, os.PathLike)) or not os.path.isdir(model):
        return "not a local checkpoint directory"
    path = os.fspath(model)
    if not os.path.exists(os.path.join(path, "config.json")):
        return "no config.json"
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        return "no safetensors weights (only safetensors can be read in slices)"
    from autodeploy.models import quantized

    if quantized.is_quantized_checkpoint(path):
        return "a pre-quantized checkpoint (its scales are loaded with the weights)"
    if _conversion_api() is None:
        import transformers

        return f"transformers {transformers.__version__} lacks the checkpoint key conversion API shard loading uses"
    return ""


# -- the checkpoint ----------------------------------------------------------------------------------------
@dataclass
class LoadStats:
    """What a rank read: bytes per checkpoint tensor, which tensors were sliced, and the full sizes."""

    checkpoint: str
    checkpoint_bytes: int = 0
    bytes_read: dict[str, int] = field(default_factory=dict)  # checkpoint key -> bytes returned by its reads
    full_bytes: dict[str, int] = field(default_factory=dict)  # checkpoint key -> its size
    sharded: set[str] = field(default_factory=set)  # checkpoint keys under a tensor-parallel cut
    reads: int = 0
    tensors: int = 0  # graph tensors materialised

    @property
    def total_read(self) -> int:
        return sum(self.bytes_read.values())

    def full_reads_of_sharded(self) -> list[str]:
        """Sharded checkpoint tensors this rank read whole (none, when every cut reached the checkpoint)."""
        return sorted(k for k in self.sharded if self.bytes_read.get(k, 0) >= self.full_bytes.get(k, 1))

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "checkpoint_bytes": self.checkpoint_bytes,
                "bytes_read": dict(self.bytes_read), "full_bytes": dict(self.full_bytes),
                "sharded": sorted(self.sharded), "reads": self.reads, "tensors": self.tensors,
                "total_read": self.total_read, "full_reads_of_sharded": self.full_reads_of_sharded()}

    def note(self) -> str:
        full = self.full_reads_of_sharded()
        return (f"weights: shard loading read {self.total_read / 2**20:.2f} MiB of the checkpoint's "
                f"{self.checkpoint_bytes / 2**20:.2f} MiB ({100.0 * self.total_read / max(1, self.checkpoint_bytes):.0f}%)"
                f" in {self.reads} slice reads; {len(self.sharded)} tensors sliced"
                + (f", read whole although sharded: {', '.join(full)}" if full else ""))


class Checkpoint:
    """The safetensors files of a directory (one file, or several named by ``model.safetensors.index.json``),
    opened once; :meth:`read` returns one slice and counts its bytes."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            weight_map = None
        self._handles: dict[str, Any] = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            try:
                self._handles[name] = safe_open(os.path.join(path, name), framework="pt", device="cpu")
            except Exception as exc:
                raise ShardLoadingError(f"{os.path.join(path, name)}: not a readable safetensors file "
                                        f"({type(exc).__name__}: {exc})") from None
            for key in self._handles[name].keys():
                if weight_map is None or weight_map.get(key) == name:
                    self.file_of[key] = name
        self.stats = LoadStats(path)
        for key in self.file_of:
            shape, dtype = self.meta(key)
            n = _numel(shape) * _itemsize(dtype)
            self.stats.full_bytes[key] = n
            self.stats.checkpoint_bytes += n

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        sl = self._handles[self.file_of[key]].get_slice(key)
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ShardLoadingError(f"checkpoint tensor {key}: dtype {sl.get_dtype()} is not supported")
        return tuple(int(s) for s in sl.get_shape()), dtype

    def read(self, key: str, index: Sequence[slice]) -> torch.Tensor:
        sl = self._handles[self.file_of[key]].get_slice(key)
        t = sl[tuple(index)] if index else self._handles[self.file_of[key]].get_tensor(key)
        n = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != n:  # a view of the whole memory-mapped tensor: keep only the slice
            t = t.clone()
        self.stats.bytes_read[key] = self.stats.bytes_read.get(key, 0) + n
        self.stats.reads += 1
        return t


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- lazy tensors: a selection (one index tensor per dim) pushed down to checkpoint reads -------------------
Sel = list  # list[torch.Tensor]: int64 indices per dim, in output order


def _full(shape: Sequence[int]) -> Sel:
    return [torch.arange(int(s)) for s in shape]


def _is_full(sel: Sel, shape: Sequence[int]) -> bool:
    return all(len(s) == n and bool((s == torch.arange(n)).all()) for s, n in zip(sel, shape))


def _runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """``idx`` as consecutive (start, stop) runs, in order."""
    if idx.numel() == 0:
        return []
    breaks = torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1
    bounds = [0, *breaks.tolist(), idx.numel()]
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


class Lazy:
    """A tensor known by shape and dtype; :meth:`read` returns the rows a selection names, reading as little
    of the checkpoint as the recipe allows. ``leaves()`` are the checkpoint keys it reads from."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, sel: Sel) -> torch.Tensor:
        raise NotImplementedError

    def leaves(self) -> set[str]:
        return set()

    def value(self) -> torch.Tensor:
        return self.read(_full(self.shape))


class Leaf(Lazy):
    def __init__(self, ck: Checkpoint, key: str):
        self.ck, self.key = ck, key
        self.shape, self.dtype = ck.meta(key)

    def leaves(self) -> set[str]:
        return {self.key}

    def read(self, sel: Sel) -> torch.Tensor:
        plans = []
        for idx in sel:
            runs = _runs(idx)
            if len(runs) <= _MAX_RUNS:
                plans.append(("runs", runs))
            else:
                lo, hi = int(idx.min()), int(idx.max()) + 1
                plans.append(("box", lo, hi, idx - lo))

        def rec(d: int, prefix: list) -> torch.Tensor:
            if d == len(plans):
                return self.ck.read(self.key, prefix)
            p = plans[d]
            if p[0] == "box":
                return rec(d + 1, prefix + [slice(p[1], p[2])]).index_select(d, p[3])
            parts = [rec(d + 1, prefix + [slice(a, b)]) for a, b in p[1]]
            if not parts:
                shape = [len(s) for s in sel]
                return torch.empty(shape, dtype=self.dtype)
            return parts[0] if len(parts) == 1 else torch.cat(parts, d)

        return rec(0, [])


class Index(Lazy):
    """``child`` indexed along ``dim`` by ``idx`` (a slice, a tensor-parallel cut)."""

    def __init__(self, child: Lazy, dim: int, idx: torch.Tensor):
        self.child, self.dim, self.idx = child, dim % len(child.shape), idx
        self.shape = tuple(len(idx) if d == self.dim else s for d, s in enumerate(child.shape))
        self.dtype = child.dtype

    def leaves(self) -> set[str]:
        return self.child.leaves()

    def read(self, sel: Sel) -> torch.Tensor:
        sel = list(sel)
        sel[self.dim] = self.idx[sel[self.dim]]
        return self.child.read(sel)


class Transpose(Lazy):
    def __init__(self, child: Lazy, a: int, b: int):
        n = len(child.shape)
        self.child, self.a, self.b = child, a % n, b % n
        shape = list(child.shape)
        shape[self.a], shape[self.b] = shape[self.b], shape[self.a]
        self.shape, self.dtype = tuple(shape), child.dtype

    def leaves(self) -> set[str]:
        return self.child.leaves()

    def read(self, sel: Sel) -> torch.Tensor:
        sel = list(sel)
        sel[self.a], sel[self.b] = sel[self.b], sel[self.a]
        return self.child.read(sel).transpose(self.a, self.b)


class Stack(Lazy):
    """transformers' ``MergeModulelist``: per-expert tensors stacked along ``dim``."""

    def __init__(self, children: list[Lazy], dim: int):
        first = children[0]
        if any(c.shape != first.shape for c in children):
            raise ShardLoadingError(f"stacking tensors of different shapes ({sorted(self._keys(children))[:3]})")
        self.children, self.dim = children, dim
        self.shape = tuple(first.shape[:dim]) + (len(children),) + tuple(first.shape[dim:])
        self.dtype = first.dtype

    @staticmethod
    def _keys(children: list[Lazy]) -> set[str]:
        return set().union(*(c.leaves() for c in children))

    def leaves(self) -> set[str]:
        return self._keys(self.children)

    def read(self, sel: Sel) -> torch.Tensor:
        rest = sel[:self.dim] + sel[self.dim + 1:]
        return torch.stack([self.children[int(i)].read(rest) for i in sel[self.dim]], self.dim)


class Cat(Lazy):
    """Concatenation along ``dim`` (transformers' ``Concatenate``)."""

    def __init__(self, children: list[Lazy], dim: int):
        first = children[0]
        self.dim = dim % len(first.shape)
        for c in children:
            if len(c.shape) != len(first.shape) or any(
                    a != b for d, (a, b) in enumerate(zip(c.shape, first.shape)) if d != self.dim):
                raise ShardLoadingError(f"concatenating tensors of incompatible shapes {first.shape}, {c.shape}")
        self.children = children
        sizes = [c.shape[self.dim] for c in children]
        self.offsets = torch.tensor([0] + sizes).cumsum(0)
        self.shape = tuple(int(self.offsets[-1]) if d == self.dim else s for d, s in enumerate(first.shape))
        self.dtype = first.dtype

    def leaves(self) -> set[str]:
        return set().union(*(c.leaves() for c in self.children))

    def read(self, sel: Sel) -> torch.Tensor:
        idx = sel[self.dim]
        if idx.numel() == 0:
            return torch.empty([len(s) for s in sel], dtype=self.dtype)
        owner = torch.searchsorted(self.offsets, idx, right=True) - 1
        parts, start = [], 0
        for stop in [*(torch.nonzero(owner[1:] != owner[:-1]).flatten() + 1).tolist(), len(idx)]:
            c = int(owner[start])
            sub = list(sel)
            sub[self.dim] = idx[start:stop] - self.offsets[c]
            parts.append(self.children[c].read(sub))
            start = stop
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)


class Cast(Lazy):
    def __init__(self, child: Lazy, dtype: torch.dtype):
        self.child, self.shape, self.dtype = child, child.shape, dtype

    def leaves(self) -> set[str]:
        return self.child.leaves()

    def read(self, sel: Sel) -> torch.Tensor:
        return self.child.read(sel).to(self.dtype)


class Whole(Lazy):
    """A computed tensor (a view that reshapes, a compile-cache recipe): its sources are read whole first, then
    the selection is taken from the result."""

    def __init__(self, fn: Callable[[list[torch.Tensor]], torch.Tensor], children: list[Lazy],
                 shape: Sequence[int], dtype: torch.dtype):
        self.fn, self.children, self.shape, self.dtype = fn, children, tuple(int(s) for s in shape), dtype
        self.cache: Optional[_Values] = None

    def leaves(self) -> set[str]:
        return set().union(*(c.leaves() for c in self.children)) if self.children else set()

    def read(self, sel: Sel) -> torch.Tensor:
        t = self.fn([self.cache.take(c) if self.cache is not None else c.value() for c in self.children])
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ShardLoadingError(f"a recipe produced {tuple(t.shape)} {t.dtype}, expected {self.shape} {self.dtype}")
        if _is_full(sel, self.shape):
            return t
        for d, idx in enumerate(sel):
            t = t.index_select(d, idx)
        return t


class _Values:
    """Source values shared by several computed tensors (a quantized weight and its scales read one float
    shard), each read once and released after its last consumer."""

    def __init__(self, roots: Sequence[Lazy]):
        self.uses: dict[int, int] = {}
        self.values: dict[int, torch.Tensor] = {}
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, Whole):
                node.cache = self
                for c in node.children:
                    self.uses[id(c)] = self.uses.get(id(c), 0) + 1
            stack.extend(getattr(node, "children", None) or ([node.child] if hasattr(node, "child") else []))

    def take(self, node: Lazy) -> torch.Tensor:
        key = id(node)
        value = self.values.pop(key, None)
        if value is None:
            value = node.value()
        left = self.uses.get(key, 0) - 1
        self.uses[key] = left
        if left > 0:
            self.values[key] = value
        return value


# -- checkpoint names of the model's tensors -----------------------------------------------------------------
def _conversion_api() -> Optional[tuple]:
    """transformers' checkpoint key conversion (``get_model_conversion_mapping``, ``rename_source_key``...), or
    None where this transformers does not have it in the form used here."""
    import inspect

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter, WeightRenaming, dot_natural_key, rename_source_key,
        )
    except ImportError:
        return None
    params = list(inspect.signature(rename_source_key).parameters)
    if params[:5] != ["source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"]:
        return None
    return get_model_conversion_mapping, WeightRenaming, WeightConverter, rename_source_key, dot_natural_key


def _hf_conversions(model: torch.nn.Module) -> tuple[list, list, Callable, Callable]:
    """transformers' key conversion for ``model``: (renamings, converters, its key renaming, its key order)."""
    api = _conversion_api()
    if api is None:
        raise ShardLoadingError("this transformers has no checkpoint key conversion API in the form shard loading "
                                "uses (transformers.core_model_loading.rename_source_key)")
    get_mapping, renaming_cls, converter_cls, rename, natural = api
    transforms = get_mapping(model)
    renamings = [t for t in transforms if isinstance(t, renaming_cls)]
    converters = [t for t in transforms if isinstance(t, converter_cls)]
    return renamings, converters, rename, natural


def _convert(converter: Any, target: str, collected: dict[str, list[Lazy]]) -> Lazy:
    """A ``WeightConverter``'s operations on lazy tensors; only merges and concatenations are known."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    state: dict[str, Any] = {p: collected[p] for p in converter.source_patterns if p in collected}
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            state = {p: Stack(v, op.dim) if isinstance(v, list) else v for p, v in state.items()}
        elif isinstance(op, Concatenate):
            parts = [state[p] for p in converter.source_patterns if p in state]
            state = {target: Cat([p if isinstance(p, Lazy) else Stack(p, 0) for p in parts], op.dim)}
        else:
            raise ShardLoadingError(f"{target}: transformers converts it from the checkpoint with "
                                    f"{type(op).__name__}, which shard loading does not implement")
    if len(state) != 1:
        raise ShardLoadingError(f"{target}: its checkpoint conversion leaves {len(state)} tensors, not one")
    (out,) = state.values()
    if isinstance(out, list):
        if len(out) != 1:
            raise ShardLoadingError(f"{target}: {len(out)} checkpoint tensors map to it and no merge is declared")
        out = out[0]
    return out


def model_sources(model: torch.nn.Module, ck: Checkpoint) -> dict[str, Lazy]:
    """Model state-dict name -> its lazy checkpoint tensor, through transformers' conversion mapping (the same
    renames and merges ``from_pretrained`` applies). Tied names share their tensor's source."""
    renamings, converters, rename, natural = _hf_conversions(model)
    meta_sd = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    direct: dict[str, Lazy] = {}
    groups: dict[tuple[int, str], dict[str, list[Lazy]]] = {}
    owners: dict[tuple[int, str], Any] = {}
    for key in sorted(ck.file_of, key=natural):
        target, pattern = rename(key, renamings, converters, prefix, meta_sd)
        if target not in meta_sd and key in meta_sd:  # as transformers does: the key was right as it was
            target, pattern = key, None
        if pattern is None:
            direct[target] = Leaf(ck, key)
        else:
            conv = by_pattern[pattern]
            groups.setdefault((id(conv), target), {}).setdefault(pattern, []).append(Leaf(ck, key))
            owners[(id(conv), target)] = conv
    for (cid, target), collected in groups.items():
        direct[target] = _convert(owners[(cid, target)], target, collected)
    # tied parameters: every name of one tensor gets the source one of its names has
    names_of: dict[int, list[str]] = {}
    for name, t in meta_sd.items():
        names_of.setdefault(id(t), []).append(name)
    for names in names_of.values():
        src = next((direct[n] for n in names if n in direct), None)
        if src is not None:
            for n in names:
                direct.setdefault(n, src)
    return direct


def load_buffers(model: torch.nn.Module, path: str) -> int:
    """Read the persistent buffers the checkpoint holds into ``model`` (whole: buffers are small and never
    sharded); computed buffers keep their constructed values. Returns how many were read."""
    ck = Checkpoint(path)
    persistent = [n for n, _ in model.named_buffers() if n in model.state_dict(keep_vars=True)]
    if not persistent:
        return 0
    sources = model_sources(model, ck)
    count = 0
    for name in persistent:
        src = sources.get(name)
        if src is None:
            continue
        owner, _, attr = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        old = mod._buffers[attr]
        if tuple(src.shape) != tuple(old.shape):
            raise ShardLoadingError(f"buffer {name}: the checkpoint holds {tuple(src.shape)}, the model "
                                    f"{tuple(old.shape)}")
        mod._buffers[attr] = src.value().to(device=old.device, dtype=old.dtype)
        count += 1
    return count


# -- graph tensors as recipes ---------------------------------------------------------------------------------
def _attr_or_none(module: torch.nn.Module, target: str) -> Optional[torch.Tensor]:
    try:
        t = getattr_path(module, target)
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None


class _Resolver:
    """Graph get_attr target -> its lazy recipe over checkpoint tensors. A recipe source may be a model tensor
    the graph no longer holds (a pass dropped the float weight it quantized): it resolves through the model."""

    def __init__(self, gm: fx.GraphModule, model: torch.nn.Module, sources: dict[str, Lazy],
                 derive_ops: dict[str, Callable], cuts: dict[str, Any]):
        self.gm, self.model, self.sources, self.derive_ops, self.cuts = gm, model, sources, derive_ops, cuts
        self.recipes: dict[str, tuple] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.meta.get(DERIVED_META):
                self.recipes.setdefault(node.target, tuple(node.meta[DERIVED_META]))
        self.memo: dict[str, Lazy] = {}
        self.cut_views: dict[str, Lazy] = {}  # a rank's cut of an expert view, shared by its quantized parts
        self.sharded: set[str] = set()  # checkpoint keys under a tensor-parallel cut

    def resolve(self, target: str) -> Lazy:
        if target not in self.memo:
            self.memo[target] = self._resolve(target)
        return self.memo[target]

    def _resolve(self, target: str) -> Lazy:
        like = _attr_or_none(self.gm, target)
        if like is not None and not is_deferred(like):
            return _Const(like)
        recipe = self.recipes.get(target)
        if recipe is not None and like is not None:
            base = self._recipe(target, recipe, like)
        else:
            name = target[2:] if target.startswith("m.") else None
            src = self.sources.get(name) if name else None
            model_t = _attr_or_none(self.model, name) if name else None
            if src is None or model_t is None:
                raise ShardLoadingError(
                    f"graph tensor {target}: no checkpoint tensor maps to it (through transformers' key conversion "
                    "for this architecture) and no pass recorded a recipe for it; it is not guessed")
            if tuple(src.shape) != tuple(model_t.shape):
                raise ShardLoadingError(f"graph tensor {target}: the checkpoint holds {tuple(src.shape)}, the model "
                                        f"{tuple(model_t.shape)}")
            base = src if src.dtype == model_t.dtype else Cast(src, model_t.dtype)
        cut = self.cuts.get(target)
        if cut is not None:
            base = self._cut(base, cut.dim, cut.ranges)
        if like is not None and tuple(base.shape) != tuple(like.shape):
            raise ShardLoadingError(f"graph tensor {target}: its checkpoint recipe gives {tuple(base.shape)}, the "
                                    f"graph expects {tuple(like.shape)}")
        return base

    def _recipe(self, target: str, recipe: tuple, like: torch.Tensor) -> Lazy:
        from autodeploy.passes.quantize_linears import MOE_RECIPE

        op, sources, *params = recipe
        if op == "zeros":
            return _Zeros(like.shape, like.dtype)
        if op == "moe_view":
            return self._moe_view(target, self.resolve(sources[0]), params[0])
        if op == MOE_RECIPE and len(params) > 3 and params[3] is not None:
            # a rank's quantized experts: the view and the tensor-parallel cut stay lazy (only the rank's slices
            # are read), then the quantizer runs on what was read
            steps, mode, part, (dim, ranges) = params[:4]
            key = json.dumps([sources[0], steps, dim, ranges])  # the weight and its scales share one read
            t = self.cut_views.get(key)
            if t is None:
                t = self.cut_views[key] = self._cut(self._moe_view(target, self.resolve(sources[0]), steps), dim,
                                                    ranges)
            fn = self.derive_ops[op]
            return Whole(lambda ts, fn=fn: fn(ts, [], mode, part), [t], like.shape, like.dtype)
        fn = self.derive_ops.get(op)
        if fn is None:
            raise ShardLoadingError(f"graph tensor {target}: its recipe {op!r} is not a known derive op "
                                    f"({sorted(self.derive_ops)})")
        children = [self.resolve(s) for s in sources]
        return Whole(lambda ts, fn=fn, params=params: fn(ts, *params), children, like.shape, like.dtype)

    def _cut(self, t: Lazy, dim: int, ranges: Sequence) -> Lazy:
        """A tensor-parallel cut (``ranges`` of ``dim``) of a lazy tensor; its checkpoint keys count as sharded."""
        t = Index(t, dim, torch.cat([torch.arange(s, s + n) for s, n in ranges]))
        self.sharded |= t.leaves()
        return t

    def _moe_view(self, target: str, t: Lazy, steps: list) -> Lazy:
        """``match_moe``'s view steps over a lazy tensor (slices and transposes pushed down to the reads)."""
        for kind, *a in steps:
            if kind == "slice":
                dim, start, stop, step = a
                size = t.shape[dim]
                t = Index(t, dim, torch.arange(*slice(start, stop, step).indices(size)))
            elif kind == "transpose":
                t = Transpose(t, a[0], a[1])
            elif kind == "view":
                shape = list(a[0])
                t = Whole(lambda ts, s=shape: ts[0].view(s), [t], torch.empty(t.shape, device="meta").view(shape).shape,
                          t.dtype)
            else:
                raise ShardLoadingError(f"graph tensor {target}: unknown MoE view step {kind!r}")
        return t


class _Const(Lazy):
    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

    def read(self, sel: Sel) -> torch.Tensor:
        t = self.t.detach().cpu()
        for d, idx in enumerate(sel):
            t = t.index_select(d, idx)
        return t


class _Zeros(Lazy):
    def __init__(self, shape: Sequence[int], dtype: torch.dtype):
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype

    def read(self, sel: Sel) -> torch.Tensor:
        return torch.zeros([len(s) for s in sel], dtype=self.dtype)


def _set(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if name in mod._parameters:
        mod._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def materialize(gm: fx.GraphModule, model: torch.nn.Module, path: str,
                derive_ops: dict[str, Callable[..., torch.Tensor]], device: Optional[torch.device] = None) -> LoadStats:
    """Give every deferred tensor the graph reads its value from the checkpoint at ``path`` (this rank's slices
    only), then drop the deferred tensors nothing reads. ``derive_ops``: the compile cache's recipe registry
    (``compile_cache.derive_ops()``). Returns what was read."""
    ck = Checkpoint(path)
    plan = gm.meta.get("tensor_parallel_plan")
    cuts = dict(getattr(plan, "weights", {}) or {})
    resolver = _Resolver(gm, model, model_sources(model, ck), derive_ops, cuts)
    targets = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "get_attr"))
    lazies = {t: resolver.resolve(t) for t in targets if is_deferred(getattr_path(gm, t))}
    _Values(list(lazies.values()))
    values: dict[str, torch.Tensor] = {}
    for target, lazy in lazies.items():
        like = getattr_path(gm, target)
        with torch.no_grad():
            value = lazy.value()
        if tuple(value.shape) != tuple(like.shape) or value.dtype != like.dtype:
            raise ShardLoadingError(f"graph tensor {target}: read {tuple(value.shape)} {value.dtype}, the graph "
                                    f"expects {tuple(like.shape)} {like.dtype}")
        values[target] = value.to(device if device is not None else like.device).contiguous()
    for target, value in values.items():
        _set(gm, target, value)
    ck.stats.tensors = len(values)
    ck.stats.sharded = set(resolver.sharded)
    dropped = 0
    for _, sub in gm.named_modules():
        for store in (sub._parameters, sub._buffers):
            for name in [n for n, t in store.items() if is_deferred(t)]:
                del store[name]
                dropped += 1
    for key in ck.stats.sharded & set(ck.stats.bytes_read):
        if ck.stats.bytes_read[key] >= ck.stats.full_bytes[key]:
            log.warning("shard loading read the sharded tensor %s whole", key)
    log.info("%s (%d deferred tensors nothing reads dropped)", ck.stats.note(), dropped)
    return ck.stats
