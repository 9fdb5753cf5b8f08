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
    unmatched_attention: list[tuple[str, str]] = field(default_factory=list)
    attention_backend: Any = None
    attention_specs: list = field(default_factory=list)
    cache_input_names: list[tuple[str, str]] = field(default_factory=list)
    quantization: Any = None  # passes.quantize_linears.QuantizationConfig, or None
    cache_dir: Optional[str] = None  # compile(cache_dir=...): engine backends keep their engine cache under it
