"""The TensorRT backend: the ONNX engine of the onnxruntime backend, built into a TensorRT plan and run by a
TensorRT execution context, inside the same runtime (scheduler, sampler, paged-KV manager).

Where ``tensorrt`` does not import (no NVIDIA libraries, or no GPU), the backend is unavailable: asked for
explicitly it raises ``BackendUnavailableError`` saying how to install it, and ``auto`` skips it with that reason
in ``explain()``. Nothing here ever stands in for a TensorRT result.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from autodeploy.backends.base import AttentionBackend, CudaGraphSupport
from autodeploy.backends.onnxruntime import OnnxRuntimeBackend, missing_packages
from autodeploy.backends.registry import register_backend

INSTALL_HINT = ("TensorRT is not installed: `pip install tensorrt` on a CUDA machine with NVIDIA's TensorRT "
                "libraries (libnvinfer; see https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/)")


def tensorrt_import_error() -> str | None:
    """Why ``import tensorrt`` fails here, or None when it works."""
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or the pip stub's RuntimeError when libnvinfer is absent
        return f"{INSTALL_HINT} (import tensorrt: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    return None


class TensorRTBackend(AttentionBackend):
    name = "tensorrt"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    metadata_fields = OnnxRuntimeBackend.metadata_fields
    capabilities = OnnxRuntimeBackend.capabilities  # the same ONNX graph, so the same variants
    # As onnxruntime: the engine's KV cache is in the model dtype; kv_cache_dtype="fp8" is refused.
    kv_cache_dtypes = ("auto",)
    # Below triton (measured kernels, CUDA graphs) and above torch: where TensorRT imports on a GPU it is a
    # capable whole-graph engine, and on a CPU-only machine ``auto`` lists why it was skipped.
    priority = 5
    cuda_graphs = CudaGraphSupport.NONE
    engine_lowering = "tensorrt"
    cache_layout = OnnxRuntimeBackend.cache_layout.replace("the session", "the TensorRT context")

    def available(self, device: torch.device, explicit: bool) -> tuple[bool, str]:
        why = tensorrt_import_error()
        if why is not None:
            return False, why
        missing = missing_packages()
        if missing:
            return False, f"the TensorRT backend builds from ONNX and needs {missing} (pip install 'autodeploy[onnx]')"
        if device.type != "cuda" or not torch.cuda.is_available():
            return False, f"TensorRT runs on CUDA devices, not {device.type}"
        return True, "available"

    def cached_attention_op(self) -> Any:
        return torch.ops.autodeploy.torch_cached_attention.default

    def lower(self, cm: Any) -> tuple[Any, str]:
        from autodeploy.backends.tensorrt.engine import lower

        return lower(cm)


register_backend(TensorRTBackend())

__all__ = ["TensorRTBackend", "INSTALL_HINT", "tensorrt_import_error"]
