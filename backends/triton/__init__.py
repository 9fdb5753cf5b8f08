"""The triton backend: paged flash/flash-decoding attention, RoPE fused with the KV-cache write, RMSNorm fused
with the residual add. Chosen automatically on CUDA; on CPU only when asked for under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util
import os

import torch

from autodeploy.backends.base import AttentionBackend, AttentionSpec
from autodeploy.backends.registry import register_backend
from autodeploy.backends.triton.partition import field_params

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _fp8_capable() -> bool:
    """E4M3 conversions in Triton kernels: GPUs of compute capability 8.9+, or the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability() >= (8, 9)


class TritonBackend(AttentionBackend):
    name = "triton"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # Decode reads the flash-decoding work partition (partition.py), derived in the one metadata node.
    metadata_fields = ("decode_work", "decode_split_start")
    # What the kernels run (ops.KERNEL_PARAMS); any other variant (chunked attention) is refused by ``supports``.
    capabilities = frozenset({"sliding_window", "logit_softcap", "sinks", "alibi_slopes"})
    # FP8 E4M3 pages with per-row scales, quantized in the cache-write kernels and dequantized in the attention
    # kernels (ops/kv_quant.py); on GPUs, E4M3 conversions need compute capability 8.9+.
    kv_cache_dtypes = ("auto", "fp8")
    priority = 10
    default_page_size = 64
    device_composed_steps = True

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        if not _HAS_TRITON:
            return False, "the triton package is not installed"
        if device.type == "cuda":
            return True, "available"
        if explicit and os.environ.get("TRITON_INTERPRET") == "1":
            return True, "CPU under TRITON_INTERPRET=1 (slow; for testing)"
        return False, "needs a CUDA device (on CPU only when requested explicitly under TRITON_INTERPRET=1)"

    def supports(self, spec: AttentionSpec) -> tuple[bool, str]:
        ok, why = super().supports(spec)
        if not ok:
            return ok, why
        if spec.head_dim > 256 or spec.head_dim % 8:
            return False, f"head_dim {spec.head_dim} unsupported (multiples of 8 up to 256)"
        if spec.v_head_dim != spec.head_dim:
            return False, "different K and V head dims"
        if spec.kv_cache_dtype == "fp8" and not _fp8_capable():
            return False, (f"an fp8 KV cache needs float8 E4M3 conversions (compute capability 8.9+); this GPU "
                           f"has {torch.cuda.get_device_capability()}")
        return True, "supported"

    def layer_metadata_fields(self, spec: AttentionSpec) -> tuple[str, ...]:
        params = field_params(spec.sliding_window, spec.num_kv_heads)
        return tuple(f"{name}:{params}" for name in self.metadata_fields)

    def cached_attention_op(self):
        from autodeploy.backends.triton import ops  # noqa: F401  (registers the ops; imports triton)

        return torch.ops.autodeploy.triton_cached_attention.default

    def graph_passes(self):
        """Tied to the triton attention op: only when triton runs attention."""
        from autodeploy.backends.triton.passes.fuse_rope_cache_write import fuse_rope_cache_write

        return [fuse_rope_cache_write]

    def model_passes(self):
        """Kernel fusions independent of the attention op: run wherever triton is available, whichever backend
        runs attention (registry.kernel_passes)."""
        from autodeploy.backends.triton.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
        from autodeploy.backends.triton.passes.fuse_fp8_act_quant import fuse_fp8_act_quant
        from autodeploy.backends.triton.passes.fuse_gated_act import fuse_gated_act
        from autodeploy.backends.triton.passes.fuse_gemv_gated_act import fuse_gemv_gated_act
        from autodeploy.backends.triton.passes.moe_kernel import moe_kernel
        from autodeploy.backends.triton.passes.quant_skinny_gemm import quant_skinny_gemm
        from autodeploy.backends.triton.passes.skinny_gemm import skinny_gemm

        return [fuse_add_rmsnorm, fuse_gated_act, skinny_gemm, fuse_gemv_gated_act, moe_kernel, quant_skinny_gemm,
                fuse_fp8_act_quant]


register_backend(TritonBackend())
