"""Canonical ops (torch.library): attention, rope, rms_norm. Importing this package registers them."""

from autodeploy.ops.attention import attend, attention, attention_reference, visible_mask
from autodeploy.ops.rms_norm import rms_norm, rms_norm_reference
from autodeploy.ops.rope import rope, rope_reference, rotate_half

__all__ = [
    "attend", "attention", "attention_reference", "visible_mask",
    "rms_norm", "rms_norm_reference", "rope", "rope_reference", "rotate_half",
]
