"""Run one step of an exported engine through an onnxruntime InferenceSession.

Every input is bound in place with IOBinding over the torch tensors' own memory (the paged caches are never
copied into the session), the outputs are bound to torch tensors allocated per step, and each layer's new K/V
rows (engine outputs, see ops.py) are then written into the paged caches at ``slot_mapping``. CPU EP here; the
CUDA EP where onnxruntime-gpu is installed (same bindings, ``cuda`` memory).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from autodeploy.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
          torch.bool: np.bool_}
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


def providers_for(device: torch.device) -> list:
    """Execution providers for ``device``; refuses a GPU without onnxruntime-gpu instead of running on the CPU.
    On a GPU the session runs on torch's current stream (``user_compute_stream``), so it sees the step inputs
    the packer uploaded and the cache writes after it are ordered behind it."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in have:
            raise BackendUnavailableError(
                f"onnxruntime on {device} needs the CUDA execution provider (pip install onnxruntime-gpu); "
                f"installed providers: {have}")
        stream = torch.cuda.current_stream(device).cuda_stream
        return [("CUDAExecutionProvider", {"device_id": device.index or 0, "user_compute_stream": str(stream)})]
    return ["CPUExecutionProvider"]


class OrtRunner:
    """Callable as ``runner(**step_inputs, **caches) -> logits [1, N, vocab]`` (what CompiledModel calls)."""

    def __init__(self, model_path: Path, cache_outputs: dict[str, str], device: torch.device,
                 engine_dir: Optional[Path] = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), options, providers=providers_for(device))
        self.providers = self.session.get_providers()
        self.device = device
        self.engine_dir = engine_dir if engine_dir is not None else Path(model_path).parent
        self.input_names = [i.name for i in self.session.get_inputs()]
        outputs = {o.name: o for o in self.session.get_outputs()}
        logits = outputs["logits"]
        self.vocab = logits.shape[-1]
        if not isinstance(self.vocab, int) or logits.type not in _ORT_TYPES:
            raise BackendUnavailableError(f"engine {model_path}: logits output {logits.shape} {logits.type} is not "
                                          "a static-vocab float tensor")
        self.logits_dtype = _ORT_TYPES[logits.type]
        missing = set(cache_outputs.values()) - set(outputs)
        if missing:
            raise BackendUnavailableError(f"engine {model_path} lacks the new-KV outputs {sorted(missing)}")
        self.cache_outputs = dict(cache_outputs)
        self._empty: dict[torch.device, torch.Tensor] = {}

    def _empty_buffer(self, device: torch.device) -> torch.Tensor:
        if device not in self._empty:
            self._empty[device] = torch.zeros(16, dtype=torch.uint8, device=device)
        return self._empty[device]

    def _bind(self, io, name: str, tensor: torch.Tensor, output: bool) -> None:
        if tensor.dtype not in _NUMPY:
            raise BackendUnavailableError(f"onnxruntime binding has no element type for {name} ({tensor.dtype})")
        dev = tensor.device
        # An empty tensor (no logits rows: a step of non-final prefill chunks) has no data pointer, which the
        # binding refuses; it gets a valid one that nothing reads or writes.
        ptr = tensor.data_ptr() if tensor.numel() else self._empty_buffer(dev).data_ptr()
        args = (name, dev.type, dev.index or 0, _NUMPY[tensor.dtype], list(tensor.shape), ptr)
        (io.bind_output if output else io.bind_input)(*args)

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        io = self.session.io_binding()
        keep = {}
        for name in self.input_names:
            keep[name] = tensors[name].contiguous()
            self._bind(io, name, keep[name], output=False)
        num_tokens = tensors["input_ids"].shape[-1]
        logits = torch.empty((1, tensors["logits_index"].shape[0], self.vocab), dtype=self.logits_dtype,
                             device=self.device)
        self._bind(io, "logits", logits, output=True)
        rows = {}
        for cache_name, out_name in self.cache_outputs.items():
            cache = tensors[cache_name]
            rows[cache_name] = torch.empty((num_tokens, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
            self._bind(io, out_name, rows[cache_name], output=True)
        self.session.run_with_iobinding(io)
        slots = tensors["slot_mapping"]
        for cache_name, new in rows.items():
            cache = tensors[cache_name]
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, new)
        return logits
