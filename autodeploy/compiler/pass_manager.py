"""Runs graph passes in order, lints after each, and records what each did for ``explain()``.

Passes are plain functions registered by name (``autodeploy.graph.passes``); generic ones live one per file
under ``passes/``, backend-specific ones under their backend (``backends/<name>/passes/``). A pass is called as
``fn(gm, ctx, **options)``; its keyword parameters are its options, validated here before any pass runs so a
typo fails fast with a ``ConfigError`` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torch import fx

from autodeploy.compiler.pipeline import PassEntry, PassSpec, _entry
from autodeploy.compiler.report import CompileReport, PassRecord
from autodeploy.errors import ConfigError
from autodeploy.graph.passes import PASSES, PassResult
from autodeploy.graph.utils import remove_dead_code

log = logging.getLogger(__name__)

_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def import_pass(name: str) -> None:
    """Registers an in-tree pass by importing ``autodeploy.passes.<name>`` if it is not registered yet."""
    if name in PASSES:
        return
    module = f"autodeploy.passes.{name}"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        importlib.import_module(module)


def _check_options(entry: PassEntry) -> None:
    """Every option must be a keyword parameter of the pass function, of its declared (or default's) type."""
    fn = PASSES[entry.name]
    params = list(inspect.signature(fn).parameters.values())[2:]  # after (gm, ctx)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = {p.name: p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    for key, value in entry.options.items():
        if key not in known:
            raise ConfigError(f"pass {entry.name!r} has no option {key!r}; its options: {sorted(known) or 'none'}")
        p = known[key]
        want = p.annotation if isinstance(p.annotation, type) else _SIMPLE_TYPES.get(str(p.annotation))
        if want is None and p.default is not p.empty and p.default is not None:
            want = type(p.default)
        if want in (int, float, bool, str):
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            ok = ok or (want is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"pass {entry.name!r} option {key!r} must be {want.__name__}, got {value!r}")
    missing = [name for name, p in known.items() if p.default is p.empty and name not in entry.options]
    if missing:
        raise ConfigError(f"pass {entry.name!r} needs options {missing}")


class PassManager:
    """Applies named passes; each is timed, linted and optionally dumped before/after."""

    def __init__(self, passes: Iterable[Union[PassSpec, PassEntry]], report: CompileReport,
                 dump_dir: Optional[str | Path] = None):
        self.entries = [_entry(p) for p in passes]
        for e in self.entries:
            import_pass(e.name)
        unknown = [e.name for e in self.entries if e.name not in PASSES]
        if unknown:
            raise ConfigError(f"unknown passes {unknown}; registered: {sorted(PASSES)}")
        for e in self.entries:
            _check_options(e)
        self.names = [e.name for e in self.entries]
        self.report = report
        self.dump_dir = Path(dump_dir) if dump_dir else None

    def run(self, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
        offset = len(self.report.passes)
        for i, entry in enumerate(self.entries, start=offset):
            name = entry.name
            self._dump(gm, f"{i:02d}_{name}_before")
            start = time.perf_counter()
            result = PASSES[name](gm, ctx, **entry.options)
            if not isinstance(result, PassResult):
                raise TypeError(f"pass {name!r} returned {type(result).__name__}, not a PassResult")
            remove_dead_code(gm)
            gm.graph.lint()
            gm.recompile()
            elapsed = time.perf_counter() - start
            notes = ([f"options: {entry.describe()[len(name) + 1:-1]}"] if entry.options else []) + list(result.notes)
            self.report.passes.append(PassRecord(name, result.num_matches, elapsed, notes))
            log.info("pass %s: %d matches in %.1f ms", name, result.num_matches, elapsed * 1e3,
                     extra={"pass": name, "matches": result.num_matches, "seconds": elapsed})
            self._dump(gm, f"{i:02d}_{name}_after")
        return gm

    def _dump(self, gm: fx.GraphModule, tag: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{tag}.txt").write_text(str(gm.graph))
