"""The pass registry: a pass is a plain function ``fn(gm, ctx, **options) -> PassResult`` registered by name.

Options are the function's keyword parameters (with defaults); a pipeline entry ``("name", {"opt": 1})``
calls ``fn(gm, ctx, opt=1)``, and the pass manager refuses options the signature does not name.

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


PassFn = Callable[..., PassResult]
PASSES: dict[str, PassFn] = {}


def register_pass(name: str, replace: bool = False) -> Callable[[PassFn], PassFn]:
    """Register ``fn`` as pass ``name``. A different function under a taken name is an error (a user pass must
    not silently shadow a built-in one) unless ``replace=True``; re-running the same definition is fine."""

    def deco(fn: PassFn) -> PassFn:
        old = PASSES.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (fn.__module__, fn.__qualname__)
        if old is not None and not same and not replace:
            from autodeploy.errors import ConfigError

            raise ConfigError(f"pass {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                              "pick another name or pass replace=True")
        PASSES[name] = fn
        fn.pass_name = name  # type: ignore[attr-defined]
        return fn

    return deco
