"""Built-in model configs with random weights: the no-download defaults for the demo, CLI and benchmarks.

Real architectures' shapes (e.g. ``llama-3.1-8b``) let GPU benchmarks measure real-size work without weights.
"""

from __future__ import annotations

import torch

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


def build_builtin(name: str = "tiny-llama", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with random weights (initialised directly on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in BUILTIN_CONFIGS:
        raise KeyError(f"unknown builtin model {name!r}; choose from {builtin_names()}")
    config = LlamaConfig(**BUILTIN_CONFIGS[name])
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()

