"""Triton kernels for Baton, each beside its plain-PyTorch reference.

One file an op: `rmsnorm`, `rope`, `swiglu`, `cross_entropy` (chunked fused linear CE),
`nf4` and `lora` (another owner). `dispatch.select_backend` picks "triton" or "reference" for
a device once, at the start of a session; `patch.patch_model` swaps the ops into HF Llama,
Mistral and Qwen2 models by module and function replacement.

Nothing is imported here on purpose: importing `kernels` must not import Triton, so the CPU
and P100 paths work where Triton is absent, and `TRITON_INTERPRET` can still be set by a test
before the first kernel module is imported.
"""
