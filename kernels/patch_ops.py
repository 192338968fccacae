"""The forwards `kernels.patch` binds onto a family's modules, one per op, each on its kernel.

Each falls back to the op's plain-PyTorch reference on tensors a Triton kernel cannot run on
(`dispatch.launchable`), so a patched model still runs anywhere. Which forward a module gets,
and with which settings, is the family's row in `kernels.architectures`.
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import nn

from baton.kernels.architectures import (
    MLP_MERGED, NORM_FP32, NORM_GEMMA, ROPE_SPLIT, SILU_ACTIVATIONS, Architecture,
)
from baton.kernels.dispatch import launchable


def norm_forward(arch: Architecture) -> Callable:
    """RMSNorm (and QK-norm) in the family's casts: Llama's, fp32-then-cast, Gemma's (1 + w)."""
    offset = 1.0 if arch.norm == NORM_GEMMA else 0.0
    cast_after = arch.norm in (NORM_FP32, NORM_GEMMA)

    def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from baton.kernels.rmsnorm import rmsnorm, rmsnorm_reference

        eps = getattr(self, "variance_epsilon", None)
        eps = self.eps if eps is None else eps
        op = rmsnorm if launchable(hidden_states) else rmsnorm_reference
        return op(hidden_states, self.weight, eps, offset, cast_after)

    return _rmsnorm_forward


def gated_activation(config, arch: Architecture) -> Optional[str]:
    """"swiglu" or "geglu" for the family's MLP activation, None when neither kernel is it."""
    from baton.kernels.geglu import GELU_TANH_ACTIVATIONS

    act = getattr(config, arch.activation, None)
    if act in SILU_ACTIVATIONS:
        return "swiglu"
    if act in GELU_TANH_ACTIVATIONS:
        return "geglu"
    return None


def _gate(kind: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from baton.kernels.geglu import geglu, geglu_reference
    from baton.kernels.swiglu import swiglu, swiglu_reference

    fused, reference = (swiglu, swiglu_reference) if kind == "swiglu" else (geglu, geglu_reference)
    fits = launchable(gate) and gate.dtype == up.dtype
    return fused(gate, up) if fits else reference(gate, up)


def mlp_forward(arch: Architecture, kind: str) -> Callable:
    """down(act(gate) * up) on the SwiGLU or GeGLU kernel; gate and up from two projections,
    or from the halves of one merged gate_up_proj (Phi-3, GLM-4)."""
    if arch.mlp_layout == MLP_MERGED:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(_gate(kind, gate, up))
    else:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(_gate(kind, self.gate_proj(x), self.up_proj(x)))
    return forward


def rope_function(arch: Architecture, original: Callable) -> Callable:
    """The modeling module's `apply_rotary_pos_emb` on the RoPE kernel (partial rotary where
    cos/sin are narrower than the head; GPT-OSS's half-width cos/sin widened to HF's layout)."""
    split = arch.rope == ROPE_SPLIT

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not launchable(q):
            return original(q, k, cos, sin, unsqueeze_dim)
        from baton.kernels.rope import apply_rope

        if split:  # [c | c]: first*c - second*s, second*c + first*s is rotate_half's rotation
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        return apply_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.baton_original = original
    return apply_rotary_pos_emb


def rebind(modules: list[nn.Module], fn: Callable) -> int:
    """Give each module `fn` as its bound forward (weights untouched); returns how many."""
    for module in modules:
        module.forward = types.MethodType(fn, module)
    return len(modules)
