"""Tiny models of every family Baton's kernel table knows, built from transformers' own config
classes: 2 layers, hidden 64, 4 query heads over 2 key/value heads, and each family's own
switches turned on (sliding windows shorter than a sample, softcaps, sinks, multipliers,
partial rotary, experts) so that a path which drops a rule moves the loss.

Initialised sharply (normal, std `SHARP`): transformers' default init gives near-uniform
attention, where a wrong mask hardly shows.
"""

from __future__ import annotations

import torch

VOCAB = 301
SHARP = 0.3
WINDOW = 8  # shorter than most samples, so sliding layers differ from global ones
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
ALTERNATING = ["sliding_attention", "full_attention"]

# model_type -> (config class, its family's own settings)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                                    "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                    "rope_theta": 10000.0})),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, decoder_sparse_step=1)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=WINDOW,
                                             layer_types=ALTERNATING, query_pre_attn_scalar=24)),
    "phi3": ("Phi3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5})),
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.2, logits_scaling=2.0)),
    "olmo2": ("Olmo2Config", dict()),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),
    "glm4": ("Glm4Config", dict(head_dim=16)),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=WINDOW, layer_types=ALTERNATING)),
}


def family_config(family: str):
    import transformers

    class_name, own = FAMILIES[family]
    return getattr(transformers, class_name)(**{**COMMON, **own})


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every floating parameter redrawn from N(0, SHARP), norms around 1 (Gemma's (1 + w)
    around 0 + noise), so attention is peaked and masks matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * SHARP
            if "norm" in name and p.dim() == 1:
                base = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(base + noise * 0.3)
            else:
                p.copy_(noise)
    return model


def tiny_family_model(family: str, *, attn: str = "sdpa"):
    """A fresh, sharpened fp32 causal LM of `family`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = family_config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return sharpen(model).float()


def save_family_model(family: str, out, tokenizer_dir, **overrides):
    """`family`'s tiny sharpened model with the tiny Llama's tokenizer (tests/fixtures_tiny.py),
    saved like a Hub checkpoint for a whole session to load."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, vocab_size=-(-len(tokenizer) // 64) * 64)
    class_name, own = FAMILIES[family]
    import transformers

    config = getattr(transformers, class_name)(**{**COMMON, **own, **ids, **overrides})
    torch.manual_seed(0)
    model = sharpen(AutoModelForCausalLM.from_config(config, dtype=torch.float32))
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
