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


def _bloom(**kw):
    from transformers import BloomConfig, BloomForCausalLM
    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, **kw))

def _mpt(**kw):
    from transformers import MptConfig, MptForCausalLM
    return MptForCausalLM(MptConfig(vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=256, expansion_ratio=2, **kw))

def _falcon_alibi(**kw):
    from transformers import FalconConfig, FalconForCausalLM
    return FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True, **kw))

def _codegen(**kw):
    from transformers import CodeGenConfig, CodeGenForCausalLM
    return CodeGenForCausalLM(CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8, **kw))

def _gpt_neo(**kw):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    return GPTNeoForCausalLM(GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=6, max_position_embeddings=256, **kw))

def _xglm(**kw):
    from transformers import XGLMConfig, XGLMForCausalLM
    return XGLMForCausalLM(XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128, max_position_embeddings=256, **kw))

def _openai_gpt(**kw):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    return OpenAIGPTLMHeadModel(OpenAIGPTConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, **kw))

def _gpt_neox_japanese(**kw):
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM
    return GPTNeoXJapaneseForCausalLM(GPTNeoXJapaneseConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_multiple_size=2, max_position_embeddings=256, **kw))

def _gpt_oss(**kw):
    from transformers import GptOssConfig, GptOssForCausalLM
    return GptOssForCausalLM(GptOssConfig(**{**COMMON, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6, **kw}))

def _granite_swa(**kw):
    from transformers import GraniteSWAConfig, GraniteSWAForCausalLM
    return GraniteSWAForCausalLM(GraniteSWAConfig(**{**COMMON, "sliding_window": 6, **kw}))

def _llama4(**kw):
    from transformers import Llama4TextConfig, Llama4ForCausalLM
    return Llama4ForCausalLM(Llama4TextConfig(**{**COMMON, "head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 2, "attention_chunk_size": 8, **kw}))


# Attention variants (autodeploy/ops/variants/): ALiBi, sinks, chunked; and older eager forms of plain attention.
VARIANT_FAMILIES = {
    "bloom": _bloom, "mpt": _mpt, "falcon_alibi": _falcon_alibi, "gpt_oss": _gpt_oss, "granite_swa": _granite_swa,
    "llama4": _llama4, "codegen": _codegen, "gpt_neo": _gpt_neo, "xglm": _xglm, "openai_gpt": _openai_gpt,
    "gpt_neox_japanese": _gpt_neox_japanese,
}
# Families HF runs only in eager attention (their sdpa path drops the sinks).
EAGER_ONLY = {"gpt_oss", "granite_swa"}


# Hybrid models: attention layers next to Mamba / conv / linear-attention layers. Those whose mixers have a cached
# form with per-sequence state (autodeploy/ops/mixers/, models/stateful/) run (STATEFUL_FAMILIES); the others'
# recurrent state is not carried across steps, and they must be refused (check_sequence_mixers), never compiled.
def _hybrid(config_cls: str, model_cls: str, **kw):
    def make(**extra):
        import transformers
        cfg = getattr(transformers, config_cls)(**{**kw, **extra})
        return getattr(transformers, model_cls)(cfg)
    return make


HYBRID_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
HYBRIDS = {
    "jamba": _hybrid("JambaConfig", "JambaForCausalLM", **HYBRID_SMALL, attn_layer_offset=1, attn_layer_period=2,
                     expert_layer_offset=1, expert_layer_period=2, num_experts=2, mamba_d_state=8,
                     mamba_expand=2, use_mamba_kernels=False),
    "bamba": _hybrid("BambaConfig", "BambaForCausalLM", **HYBRID_SMALL, attn_layer_indices=[1],
                     mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1),
    "zamba2": _hybrid("Zamba2Config", "Zamba2ForCausalLM", **HYBRID_SMALL, mamba_d_state=8, mamba_headdim=16,
                      n_mamba_heads=8, layers_block_type=["mamba", "hybrid"], num_mem_blocks=1),
    "granitemoehybrid": _hybrid("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", **HYBRID_SMALL,
                                layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32,
                                mamba_d_state=8, num_local_experts=2, num_experts_per_tok=1),
    "falcon_h1": _hybrid("FalconH1Config", "FalconH1ForCausalLM", **HYBRID_SMALL, mamba_n_heads=4,
                         mamba_d_head=32, mamba_d_ssm=128, mamba_d_state=8, mamba_n_groups=1),
    "lfm2": _hybrid("Lfm2Config", "Lfm2ForCausalLM", **HYBRID_SMALL, layer_types=["conv", "full_attention"]),
    "lfm2_moe": _hybrid("Lfm2MoeConfig", "Lfm2MoeForCausalLM", **HYBRID_SMALL,
                        layer_types=["conv", "full_attention"], num_experts=2, num_experts_per_tok=1,
                        moe_intermediate_size=64, num_dense_layers=0),
    "qwen3_next": _hybrid("Qwen3NextConfig", "Qwen3NextForCausalLM", **HYBRID_SMALL, head_dim=16,
                          layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                          num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
                          shared_expert_intermediate_size=64),
    "minimax": _hybrid("MiniMaxConfig", "MiniMaxForCausalLM", **HYBRID_SMALL, head_dim=16,
                       layer_types=["linear_attention", "full_attention"], num_local_experts=2,
                       num_experts_per_tok=1, block_size=8),
}


# Hybrids that compile and match HF (tests/test_recurrent_state.py); every other HYBRIDS entry is refused.
STATEFUL_FAMILIES = ("lfm2", "lfm2_moe", "bamba", "granitemoehybrid", "zamba2", "falcon_h1", "jamba", "minimax",
                     "qwen3_next")
REFUSED_HYBRIDS = tuple(f for f in HYBRIDS if f not in STATEFUL_FAMILIES)


def make_model(family: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, **kw):
    """Build a tiny model with random weights. Output-projection weights are scaled up so greedy decoding has
    clear margins (tiny random models otherwise produce near-ties that any reordering of float sums flips)."""
    torch.manual_seed(seed)
    model = {**FAMILIES, **VARIANT_FAMILIES, **HYBRIDS}[family](**kw)
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head is not None and not getattr(model.config, "tie_word_embeddings", False):
            head.weight.mul_(4.0)
    return model.to(dtype).eval()
