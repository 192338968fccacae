"""Kernel micro-benchmarks: `bench.py --kernel nf4|lora_mlp`.

- `nf4`: Baton's NF4 dequantization kernel against bitsandbytes' `dequantize_4bit` on the
  preset's largest projection ([intermediate, hidden]), in the session's dtype; exit 2 on a
  GPU below sm_75 (no Triton there).
- `lora_mlp`: what one LoRA MLP keeps between its forward and its backward (saved-tensor
  bytes: the distinct tensors autograd packs, less the input x and the parameters) on PEFT's
  path and on Baton's fused path, on the preset's hidden and intermediate sizes. Under gradient
  checkpointing this is what one layer holds from its recompute to its backward.
"""

from __future__ import annotations

import torch

from baton.scripts.bench_presets import INIT_STD, preset_config


def _time(stmt, globals_: dict, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return Timer(stmt=stmt, globals=globals_).blocked_autorange(min_run_time=min_run_time).median


def check_kernel_device(capability: tuple[int, int] | None) -> None:
    """`--kernel` times a Triton kernel: refuse a CUDA GPU below sm_75 (KernelChoiceError)."""
    from baton.kernels.dispatch import check_triton_capability

    check_triton_capability(capability)


def bench_nf4(args, device: torch.device, dtype: torch.dtype, capability) -> dict:
    """Time Baton's NF4 dequantization against bitsandbytes on the preset's largest projection.

    `dtype` is the one a session of this precision dequantizes to."""
    check_kernel_device(capability)
    import bitsandbytes.functional as bnbf

    from baton.kernels.dispatch import launchable, triton_available

    config = preset_config(args.preset)
    shape = (config.intermediate_size, config.hidden_size)
    w = torch.randn(shape, device=device, dtype=dtype) * INIT_STD
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    result: dict = {"kernel": "nf4", "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch.")}
    g = {"bnbf": bnbf, "packed": packed, "state": state}
    result["bitsandbytes_s"] = _time("bnbf.dequantize_4bit(packed, state)", g, args.min_run_time)
    # Triton is an optional third-party package (the reference path runs without it); without
    # it there is no Baton kernel to time. kernels.nf4 itself is ours: imported unguarded.
    if not triton_available():
        return {**result, "baton_s": None, "note": "triton is not installed"}
    if not launchable(packed):
        return {**result, "baton_s": None, "note": "Triton needs CUDA or TRITON_INTERPRET=1"}
    from baton.kernels.nf4 import dequantize_nf4

    g["dequantize_nf4"] = dequantize_nf4
    result["baton_s"] = _time("dequantize_nf4(packed, state, dtype)", {**g, "dtype": dtype},
                              args.min_run_time)
    want = bnbf.dequantize_4bit(packed, state)
    result["max_abs_diff"] = float((dequantize_nf4(packed, state, dtype) - want).abs().max())
    result["speedup"] = result["bitsandbytes_s"] / result["baton_s"]
    return result


def _saved_bytes(run, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves while `run()` builds its graph, less those
    sharing storage with `exclude` (the input, and the weights: a view of a frozen weight
    costs no memory)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and not isinstance(t, torch.nn.Parameter):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    out.float().sum().backward()  # the graph it saved is a working one
    return sum(seen.values())


def peft_mlp(hidden: int, inter: int, r: int, dtype: torch.dtype, device: torch.device):
    """A Llama MLP over bitsandbytes NF4 layers with PEFT LoRA on gate, up and down."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter))
    for name in ("gate_proj", "up_proj", "down_proj"):
        dense = getattr(mlp, name)
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False,
                                  compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.to(dtype), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
        setattr(mlp, name, layer.to(device))  # quantizes
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["gate_proj", "up_proj", "down_proj"])
    return get_peft_model(mlp, lora).train()


def bench_lora_mlp(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Saved-tensor bytes of one LoRA MLP: PEFT's own path against Baton's fused one."""
    from baton.kernels.dispatch import launchable
    from baton.kernels.lora_patch import patch_peft_lora

    hidden, inter = args.mlp_shape or _preset_mlp(args.preset)
    r, tokens = 16, args.seq_len
    model = peft_mlp(hidden, inter, r, dtype, device)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(
        device, dtype).requires_grad_()
    result = {"kernel": "lora_mlp", "tokens": tokens, "hidden": hidden, "intermediate": inter,
              "r": r, "dtype": str(dtype).removeprefix("torch."),
              "tokens_x_intermediate_bytes": tokens * inter * x.element_size(),
              "peft_saved_bytes": _saved_bytes(lambda: model(x), [x, *model.parameters()])}
    if not launchable(x):
        return {**result, "baton_saved_bytes": None,
                "note": "the fused MLP needs CUDA or TRITON_INTERPRET=1"}
    patch_peft_lora(model, "triton")
    result["baton_saved_bytes"] = _saved_bytes(lambda: model(x), [x, *model.parameters()])
    return result


def _preset_mlp(preset: str) -> tuple[int, int]:
    config = preset_config(preset)
    return config.hidden_size, config.intermediate_size
