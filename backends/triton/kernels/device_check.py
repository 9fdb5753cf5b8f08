"""Once-per-device checks of a kernel family against its torch reference, before any model output depends on it.

A kernel that is only proven under the interpreter (or on another GPU) can still miscompile on the device in
hand; a wrong layout or conversion would then answer wrong silently. Each family checks itself on small inputs
at first use on a device, and where the check fails the op serves the reference instead, with an error logged.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

__all__ = ["kernels_agree", "check_results"]

log = logging.getLogger(__name__)

# kernel family -> its results by device (the dict the family passes in), for explain()
_FAMILIES: dict[str, dict[str, bool]] = {}


def check_results() -> dict[tuple[str, str], bool]:
    """``(kernel family, device) -> passed`` for every per-device check this process has run."""
    return {(what, dev): ok for what, checked in _FAMILIES.items() for dev, ok in checked.items()}


def kernels_agree(checked: dict[str, bool], device: torch.device, what: str, op: str,
                  check: Callable[[], bool]) -> bool:
    """Whether kernels ``what`` reproduce the reference on ``device``: ``check()`` once per device (its result kept
    in ``checked``, keyed by the device's name). On a disagreement, or a kernel that fails to compile or launch
    there, the reference op ``op`` serves instead. While a CUDA graph is being captured the check cannot
    synchronise, so an unchecked device uses the reference op for that call."""
    key = str(device)
    _FAMILIES[what] = checked
    if key not in checked:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        try:
            ok = bool(check())
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run here is a kernel not to use here
            log.error("the %s Triton kernels failed on %s (%s: %s); %s uses the reference op there", what, device,
                      type(exc).__name__, exc, op)
            ok = False
        else:
            if not ok:
                log.error("the %s Triton kernels disagree with the reference on %s; %s uses the reference op "
                          "there", what, device, op)
        checked[key] = ok
    return checked[key]
