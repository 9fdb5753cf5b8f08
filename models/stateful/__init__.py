"""Module-level rewrites of HF stateful mixers before export: the mixer module's forward is replaced, for the
export only, by one that calls the canonical mixer ops (autodeploy/ops/mixers/) with the module's own parameters.
Matching the ATen soup HF's torch forward exports to would be fragile; a rewrite keyed by the HF module class,
applied only when the module's configuration is a form verified against HF eager, is not.

A rewrite is one file here that calls :func:`register_mixer_rewrite` with the HF class name, a ``check`` that
returns None for a verified form (else the reason it is not), and the replacement ``forward``. A module whose
check fails keeps HF's forward, and the mixer check then refuses the model naming the layer and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixerRewrite:
    module_class: str
    check: Callable[[torch.nn.Module], Optional[str]]
    forward: Callable[..., torch.Tensor]


MIXER_REWRITES: dict[str, MixerRewrite] = {}


def register_mixer_rewrite(module_class: str, check: Callable[[torch.nn.Module], Optional[str]],
                           forward: Callable[..., torch.Tensor]) -> MixerRewrite:
    if module_class in MIXER_REWRITES:
        raise ValueError(f"a mixer rewrite for {module_class} is already registered")
    MIXER_REWRITES[module_class] = rewrite = MixerRewrite(module_class, check, forward)
    return rewrite


def find_mixers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, MixerRewrite, Optional[str]]]:
    """Every module of a registered class: ``(path, module, rewrite, why_not)`` (``why_not`` None: rewritable)."""
    out = []
    for path, module in model.named_modules():
        rewrite = MIXER_REWRITES.get(type(module).__name__)
        if rewrite is not None:
            out.append((path, module, rewrite, rewrite.check(module)))
    return out


def is_stateful(model: torch.nn.Module) -> bool:
    return bool(find_mixers(model))


def missing_form(module: torch.nn.Module, attrs: tuple[str, ...], silu: bool = False) -> Optional[str]:
    """The first reason a rewrite's ``check`` shares: an attribute it reads is missing, or (``silu``) the
    mixer's activation is not the verified SiLU. None when neither."""
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        return f"missing attributes {missing}"
    if silu and module.activation not in ("silu", "swish"):
        return f"activation {module.activation!r} (verified: silu)"
    return None


_KEPT = "kept (unverified form"  # how rewrite_mixers' notes mark a module left as HF wrote it


@contextlib.contextmanager
def refusals_name_unrewritten(notes: list[str]) -> Iterator[None]:
    """A model refused inside the block (at export, or by the mixer check) names the stateful mixers that
    ``rewrite_mixers`` left as HF wrote them (``notes``: its notes): the likely reason."""
    from autodeploy.errors import UnsupportedModelError

    try:
        yield
    except UnsupportedModelError as exc:
        kept = [line for line in notes if _KEPT in line]
        if kept and exc.args:
            exc.args = (f"{exc.args[0]}; stateful mixers not rewritten: {'; '.join(kept)}", *exc.args[1:])
        raise


@contextlib.contextmanager
def rewrite_mixers(model: torch.nn.Module, notes: Optional[list[str]] = None) -> Iterator[int]:
    """Within the block, every verified stateful mixer of ``model`` runs the canonical ops; HF's forward is back
    afterwards (the caller's model is unchanged). Yields the number of modules rewritten; ``notes`` gets one line
    per rewritten or skipped class."""
    patched: list[torch.nn.Module] = []
    summary: dict[str, list[str]] = {}
    try:
        for path, module, rewrite, why_not in find_mixers(model):
            if why_not is not None:
                log.warning("stateful mixer %s (%s) not rewritten: %s", path, rewrite.module_class, why_not)
                summary.setdefault(f"{rewrite.module_class} {_KEPT}: {why_not})", []).append(path)
                continue
            module.forward = types.MethodType(rewrite.forward, module)
            patched.append(module)
            summary.setdefault(f"{rewrite.module_class} -> canonical mixer ops", []).append(path)
        if notes is not None:
            notes.extend(f"{what}: {len(paths)} module(s), first {paths[0]}" for what, paths in summary.items())
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward shows through again


from autodeploy.models.stateful import lfm2, mamba2, minimax  # noqa: E402,F401  (register the rewrites)
from autodeploy.models.stateful import jamba  # noqa: E402,F401  (registers the Jamba rewrite)
from autodeploy.models.stateful import qwen3_next  # noqa: E402,F401  (registers the Qwen3-Next rewrite)

__all__ = ["MIXER_REWRITES", "MixerRewrite", "find_mixers", "is_stateful", "missing_form",
           "refusals_name_unrewritten", "register_mixer_rewrite", "rewrite_mixers"]
