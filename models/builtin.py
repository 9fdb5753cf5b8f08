"""Built-in model configs with random weights: the no-download defaults for the demo, CLI and benchmarks.

Real architectures' shapes (e.g. ``llama-3.1-8b``) let GPU benchmarks measure real-size work without weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from autodeploy.errors import UnsupportedModelError

DEFAULT_BUILTIN = "tiny-llama"

BUILTIN_CONFIGS: dict[str, dict] = {
    # The README demo: small enough for a 2-core CPU, big enough to be a real Llama.
    "tiny-llama": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, head_dim=64),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0),
}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_CONFIGS)


def build_builtin(name: str = DEFAULT_BUILTIN, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with random weights (initialised directly on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in BUILTIN_CONFIGS:
        raise UnsupportedModelError(f"unknown builtin model {name!r}; choose from {', '.join(builtin_names())}")
    config = LlamaConfig(**BUILTIN_CONFIGS[name])
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def load(arg: Optional[str] = None, dtype: Optional[torch.dtype] = None,
         device: Optional[torch.device] = None) -> tuple[torch.nn.Module, Any, list[str]]:
    """``builtin`` / ``builtin:NAME`` as a model source: random weights built straight in ``dtype`` on ``device``
    (an 8B config never passes through host fp32), no tokenizer."""
    name = arg or DEFAULT_BUILTIN
    model = build_builtin(name, dtype=dtype or torch.float32, device=device or "cpu")
    return model, None, [f"builtin:{name}: random weights (no tokenizer: prompts are token ids)"]
