"""The Hugging Face architectures Baton patches, in one table: one row a family.

`kernels.patch` (RMSNorm and QK-norm, RoPE, the gated MLP, the fused loss) and
`kernels.lora_patch` (the fused LoRA projections) both read it, so adding an architecture is one
row here. Class names are strings, not imports: reading the table must not import
transformers, and the patches match modules by class name along the MRO (a subclass swapped in
by another library still matches).

An architecture outside the table still gets the ops that do not depend on the family (the
fused LoRA projections, the chunked loss) wherever its modules have the shapes they need;
`kernels.patch` names the ops that stay unfused.
"""

from __future__ import annotations

from dataclasses import dataclass

# RMSNorm casts (kernels/rmsnorm.py): Llama's rounds the normalised row to the input dtype
# before the weight multiply; "fp32" multiplies in fp32 and casts after (OLMo 2, GPT-OSS);
# "gemma" is that with the (1 + weight) scale of Gemma 2 and 3.
NORM_LLAMA, NORM_FP32, NORM_GEMMA = "llama", "fp32", "gemma"
# MLP layouts: "split" gate_proj / up_proj / down_proj; "merged" one gate_up_proj whose output
# is [gate | up] (Phi-3, GLM-4); "" none Baton fuses (GPT-OSS's experts only).
MLP_SPLIT, MLP_MERGED = "split", "merged"
# RoPE: "half" HF's rotate_half (partial rotary where cos/sin are narrower than the head);
# "split" GPT-OSS's, whose cos/sin hold one half of the head (the same rotation);
# "" HF's own function (GLM-4 rotates interleaved pairs, which the kernel does not).
ROPE_HALF, ROPE_SPLIT = "half", "split"


@dataclass(frozen=True)
class Architecture:
    """Where one architecture keeps what Baton replaces, and how its ops differ."""

    model_type: str  # config.model_type
    modeling_module: str  # holds the global `apply_rotary_pos_emb` the attention looks up
    rmsnorm: str  # class names of the modules whose forward is replaced (QK-norm included)
    attention: str
    mlp: str  # "" when no MLP of the family is fused
    norm: str = NORM_LLAMA
    mlp_layout: str = MLP_SPLIT
    activation: str = "hidden_act"  # the config attribute that names the MLP's activation
    rope: str = ROPE_HALF
    qk_norm: bool = False  # for the README and the report: its q_norm/k_norm are `rmsnorm`


def _row(model_type: str, module: str, prefix: str, **kw) -> Architecture:
    mlp = kw.pop("mlp", f"{prefix}MLP")
    return Architecture(model_type, f"transformers.models.{module}.modeling_{module}",
                        f"{prefix}RMSNorm", f"{prefix}Attention", mlp, **kw)


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _row("llama", "llama", "Llama"),
        _row("mistral", "mistral", "Mistral"),
        _row("qwen2", "qwen2", "Qwen2"),
        _row("qwen3", "qwen3", "Qwen3", qk_norm=True),
        # The experts are 3D parameters, not Linear modules: only dense MLP layers are fused.
        _row("qwen3_moe", "qwen3_moe", "Qwen3Moe", qk_norm=True),
        _row("gemma2", "gemma2", "Gemma2", norm=NORM_GEMMA, activation="hidden_activation"),
        _row("gemma3_text", "gemma3", "Gemma3", norm=NORM_GEMMA,
             activation="hidden_activation", qk_norm=True),
        _row("phi3", "phi3", "Phi3", mlp_layout=MLP_MERGED),
        _row("granite", "granite", "Granite"),
        _row("olmo2", "olmo2", "Olmo2", norm=NORM_FP32, qk_norm=True),
        _row("smollm3", "smollm3", "SmolLM3"),
        _row("glm4", "glm4", "Glm4", mlp_layout=MLP_MERGED, rope=""),
        _row("gpt_oss", "gpt_oss", "GptOss", mlp="", norm=NORM_FP32, rope=ROPE_SPLIT),
    )
}

ATTENTION_CLASSES: frozenset[str] = frozenset(a.attention for a in ARCHITECTURES.values())
MLP_CLASSES: frozenset[str] = frozenset(a.mlp for a in ARCHITECTURES.values() if a.mlp)

# `config.hidden_act` values for which the MLP is down(silu(gate) * up), i.e. SwiGLU.
SILU_ACTIVATIONS: frozenset[str] = frozenset({"silu", "swish"})


def known_architectures() -> str:
    """The model types of the table, for messages: 'llama, mistral, qwen2, ...'."""
    return ", ".join(ARCHITECTURES)
