"""Triton kernels for Baton, each beside its plain-PyTorch reference.

One file an op: `rmsnorm`, `rope`, `swiglu`, `cross_entropy` (chunked fused linear CE),
`nf4` (NF4 dequantization) and `lora` (fused LoRA projections). `dispatch.select_backend`
picks "triton" or "reference" for a device once, at the start of a session, and
`dispatch.patching_enabled()` is False under `BATON_KERNELS=none`. `patch.patch_model` swaps
the ops into the HF models of `architectures` (Llama, Mistral, Qwen2) by module and function
replacement, and `lora_patch.patch_peft_lora` the fused LoRA functions into PEFT's layers.

Nothing is imported here on purpose: importing `kernels` must not import Triton, so the CPU
and P100 paths work where Triton is absent, and `TRITON_INTERPRET` can still be set by a test
before the first kernel module is imported.
"""
