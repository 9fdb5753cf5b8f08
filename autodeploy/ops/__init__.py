"""Canonical ops (torch.library): attention (schema from the variant registry), the cached-attention schema,
rope, rms_norm. Importing this package registers them."""

from autodeploy.ops.attention import attend, attention, attention_reference, visible_mask
from autodeploy.ops.cached import (
    CACHED_OPS, cached_call, cached_inputs, cached_op_info, define_cached_attention, is_cached_attention,
)
from autodeploy.ops import quant  # noqa: F401  (registers fp8_linear, int8_linear, int8_weight_linear)
from autodeploy.ops import moe  # noqa: F401  (registers moe_experts)
from autodeploy.ops.rms_norm import rms_norm, rms_norm_reference
from autodeploy.ops.rope import rope, rope_reference, rotate_half

__all__ = [
    "attend", "attention", "attention_reference", "visible_mask", "CACHED_OPS", "cached_call", "cached_inputs",
    "cached_op_info", "define_cached_attention", "is_cached_attention",
    "rms_norm", "rms_norm_reference", "rope", "rope_reference", "rotate_half",
]
