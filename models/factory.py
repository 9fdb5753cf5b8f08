"""Model factory: load an HF causal LM (instance or local checkpoint directory), check it is something we can
compile, and export it with torch.export (dynamic batch and sequence) into an ATen-level GraphModule."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx
from torch.export import Dim

from autodeploy.errors import UnsupportedModelError
from autodeploy.models.defaults import family_defaults

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class ModelInfo:
    """What the runtime needs to know about the model, taken from its config once."""

    name: str
    family: str
    vocab_size: int
    num_layers: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    generation_config: Any = None
    tokenizer: Any = None
    defaults: dict = field(default_factory=dict)


class _LogitsOnly(torch.nn.Module):
    """Export wrapper: a plain ``(input_ids, position_ids) -> logits`` signature without HF's cache objects."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def load_model(model_or_path: Any, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
               attn_implementation: Optional[str] = None) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer_or_None)``; a path must be a local HF checkpoint directory."""
    tokenizer = None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
            raise UnsupportedModelError(f"{path!r} is not a local checkpoint directory with a config.json")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        _check_config(config, type(config).__name__)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", attn_implementation=attn_implementation or "sdpa")
        except ValueError as exc:
            raise UnsupportedModelError(f"{path}: not loadable as a causal LM ({exc})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:  # no tokenizer files: token-id prompts still work
            tokenizer = None
    elif isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
    else:
        raise UnsupportedModelError(
            f"expected an HF model instance or a checkpoint directory, got {type(model_or_path).__name__}")
    check_supported(model)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"dtype {dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    model = model.eval()
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    model_dtype = next(model.parameters()).dtype
    if model_dtype not in SUPPORTED_DTYPES:
        raise UnsupportedModelError(f"model dtype {model_dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    return model, tokenizer


def _check_config(config: Any, name: str) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; autodeploy compiles decoder-only causal LMs")


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{name} has no HF config; pass a transformers PreTrainedModel")
    _check_config(config, name)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if not can_generate or not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{name} is not a causal language model (encoder-only or headless); autodeploy compiles decoder-only "
            "causal LMs such as *ForCausalLM")


def model_info(model: torch.nn.Module, tokenizer: Any = None) -> ModelInfo:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(text, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    family = getattr(text, "model_type", "unknown")
    param = next(model.parameters())
    return ModelInfo(
        name=type(model).__name__, family=family, vocab_size=int(text.vocab_size),
        num_layers=int(getattr(text, "num_hidden_layers", getattr(text, "n_layer", 0)) or 0),
        dtype=param.dtype, device=param.device, eos_token_ids=eos_ids,
        pad_token_id=getattr(gen, "pad_token_id", None) if gen is not None else None,
        max_position_embeddings=getattr(text, "max_position_embeddings", getattr(text, "n_positions", None)),
        generation_config=gen, tokenizer=tokenizer, defaults=family_defaults(family),
    )


def export_model(model: torch.nn.Module, max_batch_size: int, max_seq_len: int, max_num_tokens: int) -> fx.GraphModule:
    """torch.export with dynamic batch and sequence dims; returns a plain-signature GraphModule."""
    device = next(model.parameters()).device
    example_len = 4
    ids = torch.zeros(2, example_len, dtype=torch.long, device=device)
    pos = torch.arange(example_len, device=device).expand(2, example_len).contiguous()
    # Dim.DYNAMIC with deferred runtime asserts: some torch versions (2.11) emit shape guards their solver
    # cannot prove over a named range (e.g. ``min(32*s, 128*s) == 32*s``) and reject the export. The guards are
    # kept as runtime asserts in the graph instead, and the cleanup pass drops them.
    dyn = Dim.DYNAMIC
    dynamic = ({0: dyn, 1: dyn}, {0: dyn, 1: dyn})
    try:
        with torch.no_grad():
            ep = torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes=dynamic, strict=False,
                                     prefer_deferred_runtime_asserts_over_guards=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"torch.export failed for {type(model).__name__}: {type(exc).__name__}: {first}") from exc
    unlifted = ep.module()
    # A fresh GraphModule drops export's pytree signature and input-constraint hooks: the cached graph gets
    # new inputs and a flattened token layout those checks know nothing about.
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(unlifted, graph)
    gm.meta.update(getattr(unlifted, "meta", {}))
    return gm
