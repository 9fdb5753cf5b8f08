"""The pass pipeline: which passes run, in which order, with which options.

A pipeline is a list of entries ``(name, options)``. ``compile(model, passes=...)`` takes a :class:`Pipeline`
or a plain list whose items are a pass name or a ``(name, {option: value})`` pair. Passes are registered by
name (``autodeploy.register_pass``) and called as ``fn(gm, ctx, **options)``: an option is a keyword parameter
of the pass function, so its signature is the option schema (checked before anything runs, see
``PassManager``). After the pipeline, the chosen attention backend's own passes and the kernel fusions of every
available backend run (``backends.registry.kernel_passes``); ``explain()`` lists every pass that ran.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

from autodeploy.errors import ConfigError

# The default pipeline, in order. Each name is a file under passes/.
DEFAULT_PASSES = [
    "cleanup",
    "match_moe",  # before the attention matchers: the experts are cut out whole, by module
    "match_attention",
    "remove_repeat_kv",
    "match_rope",
    "tabulate_rope",
    "match_rmsnorm",
    "gather_logits",
    "insert_kv_cache",
    "insert_state_cache",  # stateful mixers (ops/mixers/): one state slot per sequence
    "check_sequence_mixers",
    "fuse_gemms",
    "quantize_linears",  # after fuse_gemms: a fused q/k/v or gate/up GEMM is quantized as one; off by default
]


@dataclass
class PassEntry:
    """One pipeline step: a registered pass name and the keyword options it is called with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.options:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in sorted(self.options.items()))})"


PassSpec = Union[str, tuple, PassEntry]


def _entry(spec: PassSpec) -> PassEntry:
    if isinstance(spec, PassEntry):
        return PassEntry(spec.name, dict(spec.options))
    if isinstance(spec, str):
        return PassEntry(spec)
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return PassEntry(spec[0], dict(spec[1]))
    raise ConfigError(f"a pipeline entry is a pass name or a (name, {{option: value}}) pair, got {spec!r}")


class Pipeline:
    """An editable, ordered list of passes with options."""

    def __init__(self, passes: Iterable[PassSpec] = ()):
        self.entries: list[PassEntry] = [_entry(p) for p in passes]

    @classmethod
    def default(cls) -> "Pipeline":
        return cls(DEFAULT_PASSES)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def _index(self, name: str) -> int:
        for i, e in enumerate(self.entries):
            if e.name == name:
                return i
        raise ConfigError(f"pass {name!r} is not in the pipeline {self.names}")

    def insert_before(self, anchor: str, spec: PassSpec, **options: Any) -> "Pipeline":
        self.entries.insert(self._index(anchor), self._with(spec, options))
        return self

    def insert_after(self, anchor: str, spec: PassSpec, **options: Any) -> "Pipeline":
        self.entries.insert(self._index(anchor) + 1, self._with(spec, options))
        return self

    def append(self, spec: PassSpec, **options: Any) -> "Pipeline":
        self.entries.append(self._with(spec, options))
        return self

    def remove(self, name: str) -> "Pipeline":
        del self.entries[self._index(name)]
        return self

    def replace(self, name: str, spec: PassSpec, **options: Any) -> "Pipeline":
        self.entries[self._index(name)] = self._with(spec, options)
        return self

    def set_options(self, name: str, **options: Any) -> "Pipeline":
        self.entries[self._index(name)].options.update(options)
        return self

    @staticmethod
    def _with(spec: PassSpec, options: dict[str, Any]) -> PassEntry:
        entry = _entry(spec)
        entry.options.update(options)
        return entry

    def copy(self) -> "Pipeline":
        return Pipeline(copy.deepcopy(self.entries))

    def describe(self) -> list[list]:
        """Plain data (names and options): what the compile-cache key and ``explain()`` record."""
        return [[e.name, dict(sorted(e.options.items()))] for e in self.entries]

    def __iter__(self) -> Iterator[PassEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(e.describe() for e in self.entries)}])"


def as_pipeline(passes: Optional[Union[Pipeline, Iterable[PassSpec]]]) -> Pipeline:
    """``None`` -> the default pipeline; a Pipeline -> a copy (compile never edits the caller's); a list -> parsed."""
    if passes is None:
        return Pipeline.default()
    if isinstance(passes, Pipeline):
        return passes.copy()
    if isinstance(passes, (str, bytes)) or not isinstance(passes, Iterable):
        raise ConfigError(f"passes must be a Pipeline or a list of pass names / (name, options) pairs, got {passes!r}")
    return Pipeline(passes)
