"""Per-family defaults. A family may pin a backend or lowering, or set a page size; users override them."""

from __future__ import annotations

FAMILY_DEFAULTS: dict[str, dict] = {
    # Gemma 2 relies on eager-only features (softcapping); our passes handle both forms, so no pin is needed.
}


def family_defaults(family: str) -> dict:
    return dict(FAMILY_DEFAULTS.get(family, {}))
