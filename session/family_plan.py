"""What `plan` and the start-up probe need to know about a model's family: its text config,
the MLP width a token goes through, whether the fused chunked loss runs for it
(kernels/patch.py's rule), and which Triton ops, in which variants, a session will run.

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


def probe_variants(cfg: Any, head_dim: int) -> dict:
    """The probe job's ops and variants for this model's family, as `kernels.patch` patches it
    on the Triton path: the family's RMSNorm (offset, casts), RoPE (partial rotary; none for
    GLM-4's interleaved pairs), SwiGLU or GeGLU, the fused LoRA MLP only for split SwiGLU MLPs;
    a model outside the table: the LoRA projections and the loss."""
    from baton.kernels.architectures import (
        ARCHITECTURES, MLP_SPLIT, NORM_FP32, NORM_GEMMA, ROPE_SPLIT,
    )
    from baton.kernels.patch_ops import gated_activation

    arch = ARCHITECTURES.get(getattr(cfg, "model_type", ""))
    if arch is None:
        return {"ops": ["lora_qkv", "lora_linear", "cross_entropy"]}
    kind = gated_activation(cfg, arch) if arch.mlp else None
    ops = ["rmsnorm"] + (["rope"] if arch.rope else []) + ([kind] if kind else [])
    ops += ["lora_qkv", "lora_linear"]
    if kind == "swiglu" and arch.mlp_layout == MLP_SPLIT:
        ops.append("lora_mlp")
    rope = getattr(cfg, "rope_parameters", None) or {}
    partial = float(rope.get("partial_rotary_factor", 1.0)) if isinstance(rope, dict) else 1.0
    rotary = head_dim if arch.rope == ROPE_SPLIT else int(head_dim * partial)
    return {"ops": ops + ["cross_entropy"], "norm_offset": 1.0 if arch.norm == NORM_GEMMA else 0.0,
            "norm_cast_after": arch.norm in (NORM_FP32, NORM_GEMMA),
            "rotary_dim": rotary - rotary % 2}
