"""The bench's presets: published architectures as random NF4 models, built on the meta device.

A 7B model is built on the meta device and materialised one linear layer at a time, each
quantized to NF4 as soon as it exists, so neither host RAM nor GPU memory ever holds the
whole 16-bit model. Both implementations get the same weights (one seeded generator). The
`hf` side is then prepared as a PEFT user does (`prepare_model_for_kbit_training`, which
upcasts the embeddings and lm_head to fp32); the `baton` side as the agent does
(`training.model.prepare_for_training`: embeddings and lm_head in the compute dtype, fp32
adapters), so no extra cast copy of lm_head is kept for the fused cross-entropy.
"""

from __future__ import annotations

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The published configs of meta-llama/Llama-3.1-8B, mistralai/Mistral-7B-v0.3, Qwen/Qwen2.5-1.5B.
PRESETS: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=None, tie_word_embeddings=False)),
    "qwen2.5-1.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, tie_word_embeddings=True)),
    # HuggingFaceTB/SmolLM2-135M(-Instruct), the test suite's real model (GQA 9/3, tied).
    "smollm2-135m": ("llama", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True)),
    "tiny": ("llama", dict(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
INIT_STD = 0.02


# --- model ------------------------------------------------------------------------------


def preset_config(name: str, num_layers: int | None = None):
    """The preset's config; `num_layers` keeps the shapes with fewer decoder layers (a FLOP
    count of a few layers under Triton's interpreter, where all 30 would take long)."""
    from transformers import AutoConfig

    model_type, kwargs = PRESETS[name]
    if num_layers:
        kwargs = {**kwargs, "num_hidden_layers": num_layers}
    return AutoConfig.for_model(model_type, **kwargs)


def _random(shape, device, dtype, gen) -> torch.Tensor:
    values = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (values * INIT_STD).to(dtype)


def _quantize_linears(model, compute_dtype) -> None:
    """Swap every nn.Linear but lm_head for an empty bnb Linear4bit (still on meta)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)


def _materialise_param(module, name, param, device, dtype, gen):
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
        data = _random(tuple(param.shape), device, dtype, gen)
        new = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=True,
                                quant_type="nf4", module=module)
        return new.to(device)  # quantizes now: the bf16 copy is freed with `data`
    if name == "bias":
        data = torch.zeros(param.shape, device=device, dtype=dtype)
    elif "norm" in type(module).__name__.lower():
        data = torch.ones(param.shape, device=device, dtype=dtype)
    else:
        data = _random(tuple(param.shape), device, dtype, gen)
    return torch.nn.Parameter(data, requires_grad=False)


def _materialise(model, device, dtype, seed: int) -> None:
    # One parameter at a time, in module order, from one seeded generator: the same model
    # for both implementations. Tied parameters stay tied (memo by identity).
    gen = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = _materialise_param(module, name, param, device, dtype, gen)
            module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


def _random_base(preset: str, device: torch.device, dtype: torch.dtype, seed: int,
                 num_layers: int | None):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = preset_config(preset, num_layers)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # init_empty_weights skips tying (Qwen2.5 shares embeddings and lm_head)
    _quantize_linears(model, dtype)
    _materialise(model, device, dtype, seed)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT reads it
    return model


def build_model(preset: str, impl: str, device: torch.device, dtype: torch.dtype, seed: int,
                num_layers: int | None = None):
    """NF4-quantized random model of the preset, LoRA (r 16, alpha 32) on all linear layers."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from baton.state_schema.config import LoraConfig
    from baton.training.model import lora_config, prepare_for_training

    model = _random_base(preset, device, dtype, seed, num_layers)
    if impl == "baton":
        return prepare_for_training(model, LoraConfig(), seed, dtype, quantized=True)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # the same LoRA init as Baton's side
    model = get_peft_model(model, lora_config(LoraConfig()))
    model.config.use_cache = False
    return model
