"""The Hugging Face architectures Baton patches, in one table.

`kernels.patch` (RMSNorm, RoPE, SwiGLU, the fused loss) and `kernels.lora_patch` (the fused
LoRA projections) both read it, so adding an architecture is one row here. Class names are
strings, not imports: reading the table must not import transformers, and the patches match
modules by class name along the MRO (a subclass swapped in by another library still matches).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Where one architecture keeps what Baton replaces."""

    model_type: str  # config.model_type
    modeling_module: str  # holds the global `apply_rotary_pos_emb` the attention looks up
    rmsnorm: str  # class names of the modules whose forward is replaced
    attention: str
    mlp: str


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", "transformers.models.llama.modeling_llama",
                     "LlamaRMSNorm", "LlamaAttention", "LlamaMLP"),
        Architecture("mistral", "transformers.models.mistral.modeling_mistral",
                     "MistralRMSNorm", "MistralAttention", "MistralMLP"),
        Architecture("qwen2", "transformers.models.qwen2.modeling_qwen2",
                     "Qwen2RMSNorm", "Qwen2Attention", "Qwen2MLP"),
    )
}

ATTENTION_CLASSES: frozenset[str] = frozenset(a.attention for a in ARCHITECTURES.values())
MLP_CLASSES: frozenset[str] = frozenset(a.mlp for a in ARCHITECTURES.values())

# `config.hidden_act` values for which the MLP is down(silu(gate) * up), i.e. SwiGLU.
SILU_ACTIVATIONS: frozenset[str] = frozenset({"silu", "swish"})


def known_architectures() -> str:
    """The model types of the table, for messages: 'llama, mistral, qwen2'."""
    return ", ".join(ARCHITECTURES)
