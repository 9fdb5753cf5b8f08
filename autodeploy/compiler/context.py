"""The typed context one compile shares across its passes: settings in, facts the passes learn out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from autodeploy.compiler.report import CompileReport


@dataclass
class CompileContext:
    """Settings and facts shared by the passes of one compile."""

    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    page_size: int
    device: torch.device
    dtype: torch.dtype
    backend: str
    report: CompileReport
    backend_fallback: bool = True  # compile(backend_fallback=...): layers the backend cannot run may fall back
    unmatched_attention: list[tuple[str, str]] = field(default_factory=list)
    attention_backend: Any = None
    attention_specs: list = field(default_factory=list)
    cache_input_names: list[tuple[str, ...]] = field(default_factory=list)
    state_specs: list = field(default_factory=list)  # backends.base.StateSpec per stateful mixer layer
    state_input_names: list[str] = field(default_factory=list)  # their state graph inputs, in order
    quantization: Any = None  # passes.quantize_linears.QuantizationConfig, or None
    kv_cache_dtype: str = "auto"  # compile(kv_cache_dtype=...): "auto" (the model dtype) or "fp8" (ops/kv_quant.py)
    cache_dir: Optional[str] = None  # compile(cache_dir=...): engine backends keep their engine cache under it
