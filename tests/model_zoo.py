"""Tiny random configs of real HF classes, shared by the tests (hidden 64, 2 layers, GQA where the family has it)."""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, **kw}))


def _mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**{**COMMON, "sliding_window": 6, **kw}))


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, **kw}))


def _qwen3(**kw):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**{**COMMON, "head_dim": 16, **kw}))


def _gemma2(**kw):
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(**{**COMMON, "head_dim": 16, "sliding_window": 6,
                                              "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, **kw}))


def _gemma3(**kw):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**COMMON, "head_dim": 16, "sliding_window": 6,
                                                 "num_hidden_layers": 3, "sliding_window_pattern": 2, **kw}))


def _phi3(**kw):
    from transformers import Phi3Config, Phi3ForCausalLM
    return Phi3ForCausalLM(Phi3Config(**{**COMMON, "pad_token_id": 0, **kw}))


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, **kw))


FAMILIES = {
    "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3, "gemma2": _gemma2,
    "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2,
}


def make_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **kw):
    """Build a tiny model with random weights. Output-projection weights are scaled up so greedy decoding has
    clear margins (tiny random models otherwise produce near-ties that any reordering of float sums flips)."""
    torch.manual_seed(seed)
    model = FAMILIES[family](**kw)
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head is not None and not getattr(model.config, "tie_word_embeddings", False):
            head.weight.mul_(4.0)
    return model.to(dtype).eval()
