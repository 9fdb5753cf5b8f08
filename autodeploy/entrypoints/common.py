"""What every entry point shares: turning command-line settings into a model and a compiled model (one
compile helper, so llm/cli/demo/bench/serve never import each other for it)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def model_arg(spec: str, dtype: torch.dtype, device: str) -> Any:
    """``builtin`` / ``builtin:NAME`` build a random-weight model; anything else is a checkpoint directory."""
    if spec == "builtin" or spec.startswith("builtin:"):
        from autodeploy.models.builtin import build_builtin

        name = spec.split(":", 1)[1] if ":" in spec else "tiny-llama"
        return build_builtin(name, dtype=dtype, device=device)
    return spec


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def resolve_cache_dir(args: argparse.Namespace) -> Optional[str]:
    if args.cache_dir == "none":
        return None
    from autodeploy.compiler.compile_cache import default_cache_dir

    return args.cache_dir or str(default_cache_dir())


def compile_from_args(args: argparse.Namespace, **extra: Any):
    from autodeploy.compiler import compile as ad_compile

    model = model_arg(args.model, resolve_dtype(args), args.device)
    return model, ad_compile(
        model, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, backend=args.backend,
        lowering=args.lowering, dtype=resolve_dtype(args), device=args.device, page_size=args.page_size,
        cache_dir=resolve_cache_dir(args), **extra)
