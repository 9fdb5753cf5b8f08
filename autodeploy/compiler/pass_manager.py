"""Runs graph passes in order, lints after each, and records what each did for ``explain()``.

Passes are plain functions registered by name (``autodeploy.graph.passes``); generic ones live one per file
under ``passes/``, backend-specific ones under their backend (``backends/<name>/passes/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

from torch import fx

from autodeploy.graph.passes import PASSES
from autodeploy.graph.utils import remove_dead_code
from autodeploy.compiler.report import CompileReport, PassRecord

log = logging.getLogger(__name__)


class PassManager:
    """Applies named passes; each is timed, linted and optionally dumped before/after."""

    def __init__(self, names: list[str], report: CompileReport, dump_dir: Optional[str | Path] = None):
        unknown = [n for n in names if n not in PASSES]
        if unknown:
            raise KeyError(f"unknown passes {unknown}; registered: {sorted(PASSES)}")
        self.names = names
        self.report = report
        self.dump_dir = Path(dump_dir) if dump_dir else None

    def run(self, gm: fx.GraphModule, ctx: Any) -> fx.GraphModule:
        for i, name in enumerate(self.names):
            self._dump(gm, f"{i:02d}_{name}_before")
            start = time.perf_counter()
            result = PASSES[name](gm, ctx)
            remove_dead_code(gm)
            gm.graph.lint()
            gm.recompile()
            elapsed = time.perf_counter() - start
            self.report.passes.append(PassRecord(name, result.num_matches, elapsed, list(result.notes)))
            log.info("pass %s: %d matches in %.1f ms", name, result.num_matches, elapsed * 1e3,
                     extra={"pass": name, "matches": result.num_matches, "seconds": elapsed})
            self._dump(gm, f"{i:02d}_{name}_after")
        return gm

    def _dump(self, gm: fx.GraphModule, tag: str) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{tag}.txt").write_text(str(gm.graph))
