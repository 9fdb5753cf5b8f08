"""The onnxruntime backend: the whole compiled graph runs as one ONNX engine in an onnxruntime session.

The graph form of attention is the torch reference's paged op (so the cached GraphModule stays a runnable
reference); the backend's own lowering (lowering.py) rewrites it into the engine form (ops.py), exports it
with torch.onnx's dynamo exporter and the onnxscript translations of translations.py, and runs it through an
InferenceSession with IOBinding (runner.py). The cache layout is the contract's paged one, kept as torch
tensors the session reads in place; the engine returns each layer's new K/V rows and the runner writes them.

Lower priority than torch: on a CPU the session runs the same per-layer page gathers as the torch reference
(no faster kernel to gain), and the torch backend keeps every lowering (torch.compile, CUDA graphs). It is
chosen by ``backend="onnxruntime"``, or by ``auto`` where nothing above it can run.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from autodeploy.backends.base import AttentionBackend, CudaGraphSupport
from autodeploy.backends.onnxruntime.export import ENGINE_VARIANTS
from autodeploy.backends.registry import register_backend
from autodeploy.backends.torch.attention import TORCH_METADATA_FIELDS

_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def missing_packages() -> list[str]:
    return [p for p in _PACKAGES if importlib.util.find_spec(p) is None]


class OnnxRuntimeBackend(AttentionBackend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    dtypes = (torch.float32, torch.float16)
    metadata_fields = TORCH_METADATA_FIELDS
    # The variants the ONNX attention translation runs; sinks, ALiBi and chunked attention are refused.
    capabilities = ENGINE_VARIANTS
    # The exported ONNX graph keeps K/V in the model dtype: kv_cache_dtype="fp8" is refused (named).
    kv_cache_dtypes = ("auto",)
    priority = -10
    cuda_graphs = CudaGraphSupport.NONE
    # The backend lowers the whole graph itself (lowering.py): ``lowering="auto"`` resolves to this.
    engine_lowering = "onnxruntime"
    cache_layout = "paged K and V per layer [num_pages, page_size, kv_heads, head_dim], read in place by the session"

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        ok, why = super().available(device, explicit)
        if not ok:
            return ok, why
        missing = missing_packages()
        if missing:
            return False, f"needs {missing} (pip install 'autodeploy[onnx]')"
        if device.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return False, "on a GPU it needs onnxruntime-gpu (the CUDA execution provider is not installed)"
        return True, "available"

    def cached_attention_op(self) -> Any:
        return torch.ops.autodeploy.torch_cached_attention.default

    def lower(self, cm: Any) -> tuple[Any, str]:
        """Export (or find in the engine cache) and open the engine: ``(runner, reason)``."""
        from autodeploy.backends.onnxruntime.lowering import lower

        return lower(cm)


register_backend(OnnxRuntimeBackend())

__all__ = ["OnnxRuntimeBackend", "missing_packages"]
