"""Attention variants, one file each. Importing this package loads every module in it (so adding a variant is
adding a file), then freezes the registry: the attention ops are generated from it (autodeploy/ops/attention.py,
autodeploy/ops/cached.py). See docs/extending.md ("an attention variant")."""

from __future__ import annotations

import importlib
import pkgutil

from autodeploy.ops.variants.base import (
    VARIANTS, AttentionVariant, EagerForm, Param, active_params, param_names, param_schema, params,
    register_variant, variants,
)


def _load_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_load_all()

__all__ = ["VARIANTS", "AttentionVariant", "EagerForm", "Param", "active_params", "param_names", "param_schema",
           "params", "register_variant", "variants"]
