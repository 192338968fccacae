"""What `plan` needs to know about a model's family: its text config, the MLP width a token
goes through, and whether the fused chunked loss runs for it (kernels/patch.py's rule).

Kept apart from session/plan.py's formulas so that those stay family-free: a mixture of
experts computes top-k experts a token (not `intermediate_size`), and a family whose loss stays
HF's (Gemma 2's final-logit softcap before the fused loss takes one) builds the full
[tokens, vocabulary] fp32 logits, which for Gemma's 262k vocabulary is most of the memory.
"""

from __future__ import annotations

from typing import Any


def text_config(cfg: Any) -> Any:
    """The language model's config (Gemma 3's multimodal config keeps it in text_config)."""
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def mlp_width(cfg: Any, hidden: int) -> int:
    """The MLP width one token's activations span: the routed experts' widths summed for a
    mixture of experts (Qwen3-MoE's moe_intermediate_size, GPT-OSS's intermediate_size, times
    experts per token), the dense intermediate size otherwise."""
    top_k = getattr(cfg, "num_experts_per_tok", None)
    dense = getattr(cfg, "intermediate_size", None) or 4 * hidden
    if top_k:
        expert = getattr(cfg, "moe_intermediate_size", None) or dense
        return int(expert * top_k)
    return int(dense)


def fused_loss(cfg: Any) -> bool:
    """True when a session's loss for this model is the chunked fused one (kernels/patch.py):
    a family of the table whose logit rule the fused loss applies, or a model outside it whose
    causal-LM class passes its lm_head's output straight to the loss."""
    from baton.kernels.architectures import ARCHITECTURES
    from baton.kernels.patch import config_logit_rule, logits_straight_to_loss

    if getattr(cfg, "model_type", "") not in ARCHITECTURES:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping.get(type(cfg), None)
        return cls is not None and logits_straight_to_loss(cls)
    rule, _ = config_logit_rule(cfg)
    return rule is not None
