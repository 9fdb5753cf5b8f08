"""The pass registry: a pass is a plain function ``fn(gm, ctx) -> PassResult`` registered by name.

It sits below every stage, so that generic passes (``passes/``) and backend passes (``backends/*/passes/``)
register without importing the compiler that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx


@dataclass
class PassResult:
    """What a pass did: how many patterns it rewrote, and notes worth showing the user."""

    num_matches: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.num_matches > 0


PassFn = Callable[[fx.GraphModule, Any], PassResult]
PASSES: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco
