"""The attention-variant registry: what one variant declares, and the one schema the attention ops come from.

A variant (a mask kind, a score modifier, an extra logit) is one file in this package that calls
:func:`register_variant` with an :class:`AttentionVariant`. It declares

* its parameters by name (``Param``: schema type and default; ``None`` means "off"),
* its reference maths as hooks on the plain-torch attention (``mask_mod``, ``score_mod``, ``extra_logit``),
* what the matcher needs to recognise it (``mask_form``, ``bias_form``, ``eager_forms``),
* the per-step metadata fields a backend may need for it (``metadata_fields``; informative).

The canonical op ``autodeploy::attention`` and every backend's cached op are generated from the registered
parameters (:func:`param_schema`), so a new variant is one new file and no edit of the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor


@dataclass(frozen=True)
class Param:
    """One named attention parameter. ``type`` is its torch.library schema type (``int?``, ``float?``,
    ``Tensor?``); its default (``None``) switches the variant off."""

    name: str
    type: str
    doc: str = ""
    default: Any = None

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")

    def active(self, value: Any) -> bool:
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return value > 0
        return True


@dataclass(frozen=True)
class EagerForm:
    """A variant's extension of the eager-attention matcher (callables get ``(gm, node)``; see
    passes/match_attention.py). Each returns ``None`` when the form is absent, else a tuple described below.

    * ``softmax_input(gm, x) -> (value, inner)``: ``x`` (the softmax input) is the variant applied to ``inner``;
      if ``strip_probs`` the variant also leaves one extra column that the probs slice off (``probs[..., :-1]``).
    * ``scores(gm, x) -> (value, inner)``: a non-affine score modifier on the chain: ``x`` is the variant applied
      to ``inner`` (the affine parts around it are proven by probing);
    * ``output(gm, pv, scores) -> (value, out, consumed)``: the ``probs @ v`` node ``pv`` is post-processed into
      ``out`` using ``scores`` (the softmax input); ``consumed`` are the extra users of ``scores`` it explains.
    """

    softmax_input: Optional[Callable] = None
    scores: Optional[Callable] = None
    output: Optional[Callable] = None
    strip_probs: bool = False


@dataclass(frozen=True)
class AttentionVariant:
    """One attention variant: its parameters, its reference maths and its matcher hooks.

    Reference hooks (all optional; positions are absolute token positions):
    * ``mask_mod(value, q_pos [N, Sq], kv_pos [N, Skv]) -> bool [N, Sq, Skv]``: keys this variant lets a query see;
    * ``score_mod(value, scores [N, Hkv, G, Sq, Skv], q_pos, kv_pos) -> scores`` (applied in ``order``);
    * ``extra_logit(value) -> [Hq]``: one extra per-head logit in the softmax denominator (no value added).

    Matcher hooks (all optional):
    * ``mask_form(allowed [Sq, Skv], candidates) -> value``: the visibility pattern is causal AND this variant;
    * ``bias_form(bias [Hb, Sq, Skv], allowed [Sq, Skv], num_heads) -> value``: an additive score bias this
      variant explains (return ``torch.Tensor`` for tensor parameters);
    * ``eager_forms``: graph forms of the eager chain (:class:`EagerForm`).
    """

    name: str
    params: tuple[Param, ...]
    doc: str = ""
    order: int = 50
    mask_mod: Optional[Callable[..., Tensor]] = None
    score_mod: Optional[Callable[..., Tensor]] = None
    extra_logit: Optional[Callable[..., Tensor]] = None
    mask_form: Optional[Callable[..., Any]] = None
    bias_form: Optional[Callable[..., Any]] = None
    eager_forms: tuple[EagerForm, ...] = ()
    metadata_fields: tuple[str, ...] = field(default_factory=tuple)

    @property
    def param(self) -> Param:
        """The main parameter (the one whose value switches the variant on)."""
        return self.params[0]


VARIANTS: dict[str, AttentionVariant] = {}
_FROZEN: list[bool] = [False]


def register_variant(variant: AttentionVariant) -> AttentionVariant:
    """Add a variant. Must happen before the attention ops are defined (importing ``autodeploy.ops``)."""
    if _FROZEN[0]:
        raise RuntimeError(f"variant {variant.name!r} registered after the attention ops were defined; "
                           "put it in autodeploy/ops/variants/ so it is loaded first")
    names = {p.name for v in VARIANTS.values() for p in v.params}
    clash = names & {p.name for p in variant.params}
    if variant.name in VARIANTS or clash:
        raise ValueError(f"variant {variant.name!r} or its parameters {sorted(clash)} already registered")
    VARIANTS[variant.name] = variant
    return variant


def freeze() -> None:
    _FROZEN[0] = True


def variants() -> list[AttentionVariant]:
    """Registered variants in application order."""
    return sorted(VARIANTS.values(), key=lambda v: (v.order, v.name))


def params() -> list[Param]:
    """Every variant parameter, in schema order."""
    return [p for v in variants() for p in v.params]


def param_names() -> tuple[str, ...]:
    return tuple(p.name for p in params())


def param_schema() -> str:
    """The variant parameters as a torch.library schema fragment: ``int? sliding_window=None, ...``."""
    return ", ".join(f"{p.type} {p.name}=None" for p in params())


def active_params(values: dict[str, Any]) -> dict[str, Any]:
    """The parameters in ``values`` that switch their variant on."""
    by_name = {p.name: p for p in params()}
    unknown = set(values) - set(by_name)
    if unknown:
        raise KeyError(f"unknown attention parameters {sorted(unknown)}; registered: {sorted(by_name)}")
    return {k: v for k, v in values.items() if by_name[k].active(v)}
