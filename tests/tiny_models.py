"""Tiny randomly initialised models of every supported architecture (CPU tests)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

CONFIGS = {
    "llama": lambda hd: tf.LlamaConfig(**COMMON, head_dim=hd),
    "mistral": lambda hd: tf.MistralConfig(**COMMON, head_dim=hd, sliding_window=24),
    "qwen2": lambda hd: tf.Qwen2Config(**COMMON, head_dim=hd, use_sliding_window=True, sliding_window=24,
                                       max_window_layers=1),
    "qwen3": lambda hd: tf.Qwen3Config(**COMMON, head_dim=hd),
    "gemma2": lambda hd: tf.Gemma2Config(**COMMON, head_dim=hd, sliding_window=24, query_pre_attn_scalar=hd,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": lambda hd: tf.Gemma3TextConfig(**COMMON, head_dim=hd, sliding_window=24, query_pre_attn_scalar=hd,
                                                  sliding_window_pattern=2),
    "phi3": lambda hd: tf.Phi3Config(**COMMON, partial_rotary_factor=0.5, sliding_window=24,
                                     pad_token_id=0),
}
CLASSES = {
    "llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
    "qwen3": tf.Qwen3ForCausalLM, "gemma2": tf.Gemma2ForCausalLM, "gemma3_text": tf.Gemma3ForCausalLM,
    "phi3": tf.Phi3ForCausalLM,
}
ARCHS = tuple(CONFIGS)


def tiny_model(arch: str, head_dim: int = 32, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](head_dim)
    if arch == "phi3":
        cfg.hidden_size = 4 * head_dim  # phi3 derives head_dim from hidden_size / heads
    cfg._attn_implementation = "eager"
    model = CLASSES[arch](cfg).to(dtype).eval()
    return model
