"""What differs per architecture in a GGUF: the llama.cpp architecture name, the tensor names,
the few value transforms llama.cpp's graph expects, and the metadata keys it reads.

The names come from the gguf package's own tables (`TensorNameMap`); the transforms are the
ones llama.cpp's `convert_hf_to_gguf.py` applies (read there, written here):
- Llama and Mistral: Q and K rows are permuted from HF's rotate-half layout to llama.cpp's
  interleaved RoPE pairs (`permute_qk`).
- Gemma 3: HF's RMSNorm multiplies by (1 + w); llama.cpp's by w, so every norm weight gets +1.
- Llama 3.1+ RoPE scaling: llama.cpp takes the per-frequency divisors as a `rope_freqs` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

from baton.export.errors import ExportError


@dataclass(frozen=True)
class Arch:
    gguf_name: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool = False
    norm_shift: float = 0.0
    key_length: bool = False  # write head_dim as attention.key/value_length


# HF model_type -> how llama.cpp runs it. Mistral is llama.cpp's `llama` (its converter does so).
ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", key_length=True),
    "gemma3_text": Arch("gemma3", norm_shift=1.0, key_length=True),
}


def arch_of(config) -> Arch:
    """The Arch of a causal LM's config; ExportError for anything a GGUF runtime cannot serve."""
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ExportError(f"this model is a {archs[0]}; GGUF runtimes (llama.cpp, Ollama, LM "
                          "Studio) serve causal language models only, so a classifier run cannot "
                          "be exported to GGUF: drop --gguf and use the merged safetensors folder")
    if config.model_type not in ARCHS:
        raise ExportError(f"GGUF export does not support model type {config.model_type!r} yet "
                          f"(supported: {', '.join(sorted(ARCHS))}); drop --gguf")
    return ARCHS[config.model_type]


def name_map(arch: Arch, n_layers: int):
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(by_name[arch.gguf_name], n_layers)


def gguf_name(names, hf_name: str) -> Optional[str]:
    """llama.cpp's name for an HF tensor, None for one llama.cpp does not take (rotary buffers)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"no llama.cpp name for tensor {hf_name!r}; this checkpoint has a "
                          "layout the GGUF export does not know, drop --gguf")
    return found


def permute_qk(weight, n_head: int, n_head_kv: Optional[int] = None):
    """HF's rotate-half rows -> llama.cpp's interleaved pairs (per head: the first half and the
    second half of the rotary dims become even and odd positions)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return (weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def transform(arch: Arch, config, hf_name: str, tensor):
    """The tensor as llama.cpp's graph expects it (a torch tensor, in its dtype; the norms
    that get shifted arrive in float32, as they are written F32)."""
    if arch.permute_qk and hf_name.endswith("q_proj.weight"):
        return permute_qk(tensor, config.num_attention_heads)
    if arch.permute_qk and hf_name.endswith("k_proj.weight"):
        return permute_qk(tensor, config.num_attention_heads, config.num_key_value_heads)
    if arch.norm_shift and hf_name.endswith("norm.weight"):
        return tensor.float() + arch.norm_shift  # in float32: the result is written F32
    return tensor


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_params(config) -> dict:
    """The RoPE parameters of the full-attention layers (Gemma 3 nests them per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("full_attention", params)


def write_metadata(writer, arch: Arch, config) -> None:
    """The hyperparameters llama.cpp reads for this architecture."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = rope_params(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if arch.permute_qk:
        writer.add_rope_dimension_count(head_dim(config))
    if arch.key_length or head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    _write_rope_scaling(writer, rope)
    if arch.gguf_name == "gemma3":
        _write_gemma3(writer, config)


def _write_rope_scaling(writer, rope: dict) -> None:
    import gguf

    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3's goes in the rope_freqs tensor
        raise ExportError(f"RoPE scaling {kind!r} has no GGUF form in this export; drop --gguf")


def _write_gemma3(writer, config) -> None:
    """Gemma 3: sliding-window layers and the optional final soft-capping. llama.cpp places the
    sliding layers by a fixed pattern, so a config whose layer_types differ is refused."""
    types = list(getattr(config, "layer_types", None) or [])
    pattern = getattr(config, "sliding_window_pattern", 6) or 6
    expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(len(types))]
    if types and types != expected:
        raise ExportError(f"this Gemma 3 config places its sliding-window layers as {types}, "
                          "not every-6th-global as llama.cpp assumes; drop --gguf")
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def extra_tensors(config) -> Iterator[tuple[str, "object"]]:
    """Tensors llama.cpp needs that HF keeps in the config: Llama 3.1's RoPE frequency divisors
    (transformers' `llama3` rope: wavelengths past the low-frequency bound are divided by
    `factor`, those under the high one kept, the band between interpolated)."""
    import torch

    rope = rope_params(config)
    if rope.get("rope_type") != "llama3":
        return
    dim, base, factor = head_dim(config), float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    divisors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    yield "rope_freqs.weight", torch.tensor(divisors, dtype=torch.float32)
