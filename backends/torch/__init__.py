"""The torch backend: pure-PyTorch paged attention on CPU and GPU, the reference for all others."""

from __future__ import annotations

import torch

from autodeploy.backends.base import AttentionBackend
from autodeploy.backends.registry import register_backend
from autodeploy.ops.variants import param_names
from autodeploy.backends.torch.attention import TORCH_METADATA_FIELDS, torch_cached_attention


class TorchBackend(AttentionBackend):
    name = "torch"
    devices = ("cpu", "cuda")
    metadata_fields = TORCH_METADATA_FIELDS
    # The reference runs every registered variant through its plain-torch hooks.
    capabilities = frozenset(param_names())
    # FP8 pages with per-row scales (autodeploy/ops/kv_quant.py), dequantized after the page gather.
    kv_cache_dtypes = ("auto", "fp8")
    priority = 0

    def cached_attention_op(self):
        return torch.ops.autodeploy.torch_cached_attention.default


register_backend(TorchBackend())

__all__ = ["TorchBackend", "torch_cached_attention"]
