"""Build, cache and run a TensorRT plan from the compiled graph's ONNX engine (TensorRT Python API, 10.x).

Build: ``trt.Builder`` -> ``create_network`` (STRONGLY_TYPED: every tensor keeps the dtype the ONNX graph gives
it, so an fp32 model is never silently run in fp16) -> ``trt.OnnxParser.parse_from_file`` (external weights
beside the file) -> ``create_builder_config`` (TF32 cleared so fp32 matmuls stay fp32; one optimization profile
with min/opt/max for the token, sequence, logits-row and page-table dims; a timing cache loaded from and saved
beside the plan) -> ``build_serialized_network``. The plan and its timing cache go into an engine-cache
directory keyed by the ONNX engine's key, the TensorRT version, the GPU and the profile, with a sha256 manifest.
Run: ``trt.Runtime.deserialize_cuda_engine``, one execution context; per step ``set_input_shape`` and
``set_tensor_address`` on torch tensors (caches in place), ``execute_async_v3`` on the current torch stream,
then the new K/V rows are written into the paged caches like the onnxruntime runner does.

Precision: the plan runs the ONNX graph's dtypes (fp32/fp16/bf16 models). FP8/INT8 come from Q/DQ nodes that
quantization passes put in the graph (a strongly typed network takes its precisions from them); the builder
flags ``BuilderFlag.FP8/INT8/FP16/BF16`` are for weakly typed networks and are not set here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from autodeploy.backends.onnxruntime import engine_files
from autodeploy.backends.onnxruntime.lowering import build_engine
from autodeploy.errors import UnsupportedModelError

log = logging.getLogger(__name__)

PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
PROFILE_FILE = "profile.json"


def profile_dims(cm: Any) -> dict[str, tuple[int, int, int]]:
    """min/opt/max per dynamic dim (names as in onnxruntime/export._DYNAMIC_DIMS)."""
    tokens, seqs = cm.max_num_tokens, cm.max_batch_size
    pages = math.ceil(cm.max_seq_len / cm.page_size)
    return {"tokens": (1, min(tokens, 256), tokens), "seqs": (1, max(1, seqs // 2), seqs),
            "seqs_plus_1": (2, max(1, seqs // 2) + 1, seqs + 1), "logits_rows": (1, seqs, tokens),
            "pages_per_seq": (1, max(1, pages // 2), pages)}


def _shapes(name: str, dims: dict, cache_shapes: dict[str, tuple[int, ...]]) -> tuple[list, list, list]:
    from autodeploy.backends.onnxruntime.export import _DYNAMIC_DIMS

    if name in cache_shapes:
        s = list(cache_shapes[name])
        return s, s, s
    if name == "batch_info":
        return [4], [4], [4]
    layout = {"input_ids": [1, "tokens"], "position_ids": [1, "tokens"], "slot_mapping": ["tokens"],
              "logits_index": ["logits_rows"], "cu_seqlens_q": ["seqs_plus_1"], "seq_lens_kv": ["seqs"],
              "page_table": ["seqs", "pages_per_seq"]}
    if name not in layout or name not in _DYNAMIC_DIMS:
        raise UnsupportedModelError(f"TensorRT profile: no shape rule for engine input {name!r}")
    return tuple([d if isinstance(d, int) else dims[d][i] for d in layout[name]] for i in range(3))


def _build(onnx_path: Path, out_dir: Path, cm: Any, cache_shapes: dict[str, tuple[int, ...]]) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedModelError(f"TensorRT's ONNX parser refused the engine: {errors}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    dims = profile_dims(cm)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, *_shapes(name, dims, cache_shapes))
    config.add_optimization_profile(profile)
    timing_path = out_dir / TIMING_CACHE_FILE
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing, False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedModelError("TensorRT could not build an engine from the ONNX graph (see the TensorRT log)")
    (out_dir / PLAN_FILE).write_bytes(bytes(plan))
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    (out_dir / PROFILE_FILE).write_text(json.dumps(dims))
    log.info("built TensorRT engine in %.1f s", time.perf_counter() - t0)


class TensorRTRunner:
    """Callable as ``runner(**step_inputs, **caches) -> logits`` over a deserialized plan."""

    def __init__(self, plan_path: Path, cache_outputs: dict[str, str], device: torch.device):
        import tensorrt as trt

        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise UnsupportedModelError(f"TensorRT could not deserialize {plan_path} (built by another version?)")
        self.context = self.engine.create_execution_context()
        self.device = device
        self.cache_outputs = dict(cache_outputs)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.engine_dir = plan_path.parent

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        keep = {}
        for name in self.inputs:
            t = tensors[name]
            if self.engine.get_tensor_location(name) == self._trt.TensorLocation.DEVICE:
                t = t.to(self.device)
            keep[name] = t.contiguous()
            self.context.set_input_shape(name, tuple(keep[name].shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        slots = tensors["slot_mapping"]
        for cache_name, out_name in self.cache_outputs.items():
            cache = tensors[cache_name]
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, outs[out_name])
        return outs["logits"]


def lower(cm: Any) -> tuple[Any, str]:
    """The plan for ``cm`` (engine cache, else built now from the ONNX engine) and its runner."""
    import tensorrt as trt

    onnx_dir, meta, note = build_engine(cm)
    if (onnx_dir / PLAN_FILE).is_file():  # a saved TensorRT engine loaded by autodeploy.load
        entry = onnx_dir
    else:
        cache_shapes = {n: tuple(t.shape) for n, t in cm.caches.items()}
        gpu = torch.cuda.get_device_properties(cm.device)
        key_payload = json.dumps({"onnx": meta["key"], "trt": trt.__version__, "gpu": gpu.name,
                                  "cc": [gpu.major, gpu.minor], "profile": profile_dims(cm), "caches": cache_shapes},
                                 sort_keys=True)
        key = "trt-" + hashlib.sha256(key_payload.encode()).hexdigest()[:32]
        cache_dir = engine_files.default_cache_dir()
        entry = engine_files.lookup(cache_dir, key)
        if entry is None:
            def build(directory: Path) -> None:
                # The ONNX goes along, so the entry (and a saved engine made from it) is self-contained.
                onnx_files = engine_files.read_json(onnx_dir, engine_files.MANIFEST)["files"]
                engine_files.copy_engine(onnx_dir, directory, list(onnx_files))
                _build(onnx_dir / engine_files.MODEL_FILE, directory, cm, cache_shapes)

            entry, _ = engine_files.store(cache_dir, key, build)
            note += f"; TensorRT plan built into {entry}"
        else:
            note += f"; TensorRT plan from engine cache {entry}"
    runner = TensorRTRunner(entry / PLAN_FILE, meta["cache_outputs"], cm.device)
    return runner, f"whole graph as a TensorRT {trt.__version__} plan (strongly typed); {note}"
