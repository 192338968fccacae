"""Fused LoRA projections over bitsandbytes NF4 weights, with hand-written backward.

For one projection with frozen base weight W (NF4, or dense), bias b and adapter A [r, in],
B [out, r], scaling s:

    y  = x W^T + b + s (x A^T) B^T
    dx = dy W + s (dy B) A          dA = s (dy B)^T x      dB = s dy^T (x A^T)      db = sum dy

W is dequantized (`kernels.nf4.dequantize_nf4`) when it is needed and dropped at once: the
forward keeps only x and the small [tokens, r] product x A^T, and the backward dequantizes W
again. The QKV function shares x between the three projections and sums one dx; the MLP
function (gate, up, SwiGLU, down) keeps x, the gate and up outputs g and u and the three
[tokens, r] products, and rebuilds only the SwiGLU output (elementwise) in the backward.
Keeping g and u, as Unsloth's LoRA_MLP keeps its e and g, spares the backward two NF4
dequantizations and two [tokens, hidden] x [hidden, intermediate] GEMMs that non-reentrant
gradient checkpointing has just done in its recompute: 9 large GEMMs per MLP per step, as in
HF + PEFT + bitsandbytes, not 11. Under checkpointing they cost one layer's two
[tokens, intermediate] buffers, held from the recompute to the MLP's backward (measured in
docs/BENCHMARKS.md). Every dx is summed in fp32,
whatever the compute dtype, and then cast to x's dtype, as autograd sums the unfused
model's branches into the fp32 residual stream.

Everything is computed in one "compute dtype": autocast's when autocast is on, else x's. The
adapters' gradients come back in the adapters' own dtype (fp32 in Baton).

The `*_reference` functions are the same maths composed from PyTorch ops and bitsandbytes'
own dequantization, differentiated by autograd; the tests hold the fused functions to them.
`kernels.lora_patch.patch_peft_lora` routes a PEFT model's attention and MLP through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baton.kernels.nf4 import dequantize_nf4
from baton.kernels.swiglu import swiglu_fwd, swiglu_bwd

_FIELDS = 6  # tensors and settings one projection passes through `Function.apply`


@dataclass(frozen=True, eq=False)
class Projection:
    """One LoRA-adapted linear layer, as the fused functions see it.

    `weight` is the packed NF4 `Params4bit` when `quant_state` is set, else a dense
    [out, in] weight. `lora_A` is [r, in], `lora_B` is [out, r].
    """

    weight: torch.Tensor
    quant_state: object | None
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def flat(self) -> tuple:
        return (self.weight, self.quant_state, self.bias, self.lora_A, self.lora_B, self.scaling)


def _unflat(args: tuple) -> list[Projection]:
    return [Projection(*args[i : i + _FIELDS]) for i in range(0, len(args), _FIELDS)]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of `x` run in: autocast's if it is on, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def dense_weight(p: Projection, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense [out, in] tensor in `dtype`; a fresh buffer for NF4, to be dropped after use."""
    if p.quant_state is None:
        return p.weight.to(dtype)
    return dequantize_nf4(p.weight, p.quant_state, dtype)


def _forward_one(x2: torch.Tensor, p: Projection):
    """y = x W^T + b + s (x A^T) B^T on 2-D x; returns (y, x A^T)."""
    dtype = x2.dtype
    w = dense_weight(p, dtype)
    y = x2 @ w.t() if p.bias is None else torch.addmm(p.bias.to(dtype), x2, w.t())
    del w
    xa = x2 @ p.lora_A.to(dtype).t()
    y.addmm_(xa, p.lora_B.to(dtype).t(), alpha=p.scaling)
    return y, xa


def _adapter_grads(dy: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, p: Projection):
    """(dy B, dA, dB) of one projection whose input was `x2`."""
    dyb = dy @ p.lora_B.to(dy.dtype)
    d_a = (dyb.t() @ x2).mul_(p.scaling)
    d_b = (dy.t() @ xa).mul_(p.scaling)
    return dyb, d_a, d_b


def _input_grad(dy: torch.Tensor, dyb: torch.Tensor, p: Projection, dx: torch.Tensor | None,
                acc_dtype: torch.dtype):
    """Adds dy W + s (dy B) A into `dx` (None: starts it in `acc_dtype`).

    Each matmul runs in dy's (compute) dtype and is rounded once; the terms are added in
    `acc_dtype`. W is dequantized again and dropped.
    """
    w = dense_weight(p, dy.dtype)
    base = dy @ w
    del w
    dx = base.to(acc_dtype) if dx is None else dx.add_(base)  # .to: no copy if same dtype
    del base
    a = p.lora_A.to(dy.dtype)
    if dx.dtype == dy.dtype:
        return dx.addmm_(dyb, a, alpha=p.scaling)
    return dx.add_(dyb @ a, alpha=p.scaling)


# The input gradient of projections that share one x (Q, K, V; gate and up) is a sum of
# several matmuls. It is summed in fp32, as autograd sums the branches of the unfused model
# into the fp32 residual stream; summed in fp16, every partial sum would round again (a
# large Q term swallows small K and V terms), and the error would grow with each projection.
_ACC_DTYPE = torch.float32


def _backward_one(dy, x2, xa, p: Projection, dx: torch.Tensor | None, need_dx: bool):
    """Gradients of one projection; adds its share of dx into `dx` (None: start it, fp32)."""
    dyb, d_a, d_b = _adapter_grads(dy, x2, xa, p)
    if need_dx:
        dx = _input_grad(dy, dyb, p, dx, _ACC_DTYPE)
    return dx, d_a, d_b


def _grads(p: Projection, d_a, d_b, dy, bias_needs_grad: bool) -> tuple:
    """The gradient slots of one projection in `Function.apply`'s argument order."""
    d_bias = dy.sum(0).to(p.bias.dtype) if bias_needs_grad else None
    return (None, None, d_bias, d_a.to(p.lora_A.dtype), d_b.to(p.lora_B.dtype), None)


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


class _FusedLoRA(torch.autograd.Function):
    """Shared plumbing: frozen parts of the projections on ctx, adapters in saved tensors."""

    @staticmethod
    def _stash(ctx, x: torch.Tensor, projs: list[Projection], dtype: torch.dtype, saved) -> None:
        ctx.x_shape, ctx.x_dtype, ctx.dtype = x.shape, x.dtype, dtype
        # Frozen base weights and their quant states stay on ctx (no copy, no version check);
        # the trainable adapters go through save_for_backward so in-place changes are caught.
        ctx.frozen = [(p.weight, p.quant_state, p.bias, p.scaling) for p in projs]
        adapters = [t for p in projs for t in (p.lora_A, p.lora_B)]
        ctx.save_for_backward(*saved, *adapters)

    @staticmethod
    def _restore(ctx, n_saved: int) -> tuple[list, list[Projection]]:
        saved = ctx.saved_tensors
        adapters = saved[n_saved:]
        projs = [
            Projection(w, qs, bias, adapters[2 * i], adapters[2 * i + 1], s)
            for i, (w, qs, bias, s) in enumerate(ctx.frozen)
        ]
        return list(saved[:n_saved]), projs

    @staticmethod
    def _bias_needs_grad(ctx, index: int) -> bool:
        return bool(ctx.needs_input_grad[1 + index * _FIELDS + 2])


class LoRALinearFunction(_FusedLoRA):
    """y = x W^T + b + s (x A^T) B^T; the O projection, and any single LoRA linear."""

    @staticmethod
    def forward(ctx, x, *flat):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            (p,) = _unflat(flat)
            x2 = _rows(x, dtype)
            y, xa = _forward_one(x2, p)
        LoRALinearFunction._stash(ctx, x, [p], dtype, [x2, xa])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        (x2, xa), (p,) = LoRALinearFunction._restore(ctx, 2)
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = _rows(dy, ctx.dtype)
            dx, d_a, d_b = _backward_one(dy2, x2, xa, p, None, ctx.needs_input_grad[0])
        dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, *_grads(p, d_a, d_b, dy2, LoRALinearFunction._bias_needs_grad(ctx, 0)))


class LoRAQKVFunction(_FusedLoRA):
    """(Q, K, V) from one x: x is saved once and dx is one sum over the three projections."""

    @staticmethod
    def forward(ctx, x, *flat):
        dtype = compute_dtype(x)
        projs = _unflat(flat)
        with torch.autocast(x.device.type, enabled=False):
            x2 = _rows(x, dtype)
            outs, xas = zip(*(_forward_one(x2, p) for p in projs))
        LoRAQKVFunction._stash(ctx, x, projs, dtype, [x2, *xas])
        return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *dys):
        (x2, *xas), projs = LoRAQKVFunction._restore(ctx, 1 + len(ctx.frozen))
        grads, dx = [], None
        with torch.autocast(x2.device.type, enabled=False):
            for i, (dy, xa, p) in enumerate(zip(dys, xas, projs)):
                dy2 = _rows(dy, ctx.dtype)
                dx, d_a, d_b = _backward_one(dy2, x2, xa, p, dx, ctx.needs_input_grad[0])
                grads.extend(_grads(p, d_a, d_b, dy2, LoRAQKVFunction._bias_needs_grad(ctx, i)))
        dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, *grads)


class LoRAMLPFunction(_FusedLoRA):
    """down(silu(gate(x)) * up(x)); keeps x, g, u and the [tokens, r] products."""

    @staticmethod
    def forward(ctx, x, *flat):
        dtype = compute_dtype(x)
        gate, up, down = _unflat(flat)
        with torch.autocast(x.device.type, enabled=False):
            x2 = _rows(x, dtype)
            g, xa_g = _forward_one(x2, gate)
            u, xa_u = _forward_one(x2, up)
            h = swiglu_fwd(g, u)
            y, ha_d = _forward_one(h, down)
            del h  # elementwise from g and u: rebuilt in the backward, not kept
        LoRAMLPFunction._stash(ctx, x, [gate, up, down], dtype, [x2, g, u, xa_g, xa_u, ha_d])
        ctx.backward_done = False
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        if ctx.backward_done:
            # The backward overwrites the saved g and u with their gradients (below).
            raise RuntimeError("the fused LoRA MLP's backward reuses its saved activations in "
                               "place and runs once per forward; run the forward again instead "
                               "of backward(retain_graph=True)")
        ctx.backward_done = True
        (x2, g, u, xa_g, xa_u, ha_d), (gate, up, down) = LoRAMLPFunction._restore(ctx, 6)
        with torch.autocast(x2.device.type, enabled=False):
            dy2 = _rows(dy, ctx.dtype)
            h = swiglu_fwd(g, u)
            # h is needed for dA of down only: drop it before dh exists, so at most three
            # [tokens, intermediate] buffers (g, u, dh) are alive at once.
            dyb, d_ad, d_bd = _adapter_grads(dy2, h, ha_d, down)
            del h
            # dh feeds the SwiGLU backward alone: it stays in the compute dtype (one
            # [tokens, intermediate] buffer, not an fp32 one twice its size).
            dh = _input_grad(dy2, dyb, down, None, dy2.dtype)
            dg, du = swiglu_bwd(dh, g, u, inplace=True)
            del dh
            dx, d_ag, d_bg = _backward_one(dg, x2, xa_g, gate, None, ctx.needs_input_grad[0])
            dx, d_au, d_bu = _backward_one(du, x2, xa_u, up, dx, ctx.needs_input_grad[0])
        dx = None if dx is None else dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        bias_grad = LoRAMLPFunction._bias_needs_grad
        return (
            dx,
            *_grads(gate, d_ag, d_bg, dg, bias_grad(ctx, 0)),
            *_grads(up, d_au, d_bu, du, bias_grad(ctx, 1)),
            *_grads(down, d_ad, d_bd, dy2, bias_grad(ctx, 2)),
        )


def lora_linear(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """Fused single LoRA projection (Triton NF4 dequantization, hand-written backward)."""
    return LoRALinearFunction.apply(x, *p.flat())


def lora_qkv(x: torch.Tensor, q: Projection, k: Projection, v: Projection):
    """Fused Q, K, V LoRA projections of one x; returns (Q, K, V)."""
    return LoRAQKVFunction.apply(x, *q.flat(), *k.flat(), *v.flat())


def lora_mlp(x: torch.Tensor, gate: Projection, up: Projection, down: Projection) -> torch.Tensor:
    """Fused LoRA MLP: down(silu(gate(x)) * up(x))."""
    return LoRAMLPFunction.apply(x, *gate.flat(), *up.flat(), *down.flat())


# --- references: the same maths by autograd, with bitsandbytes' own dequantization ---------


def _reference_weight(p: Projection, dtype: torch.dtype) -> torch.Tensor:
    if p.quant_state is None:
        return p.weight.to(dtype)
    import bitsandbytes.functional as bnbf  # only the reference needs bitsandbytes itself

    return bnbf.dequantize_4bit(p.weight, p.quant_state).to(dtype)


def lora_linear_reference(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """Plain PyTorch twin of `lora_linear`, differentiated by autograd."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        xc = x.to(dtype)
        bias = None if p.bias is None else p.bias.to(dtype)
        base = F.linear(xc, _reference_weight(p, dtype), bias)
        lora = F.linear(F.linear(xc, p.lora_A.to(dtype)), p.lora_B.to(dtype))
        return base + p.scaling * lora


def lora_qkv_reference(x: torch.Tensor, q: Projection, k: Projection, v: Projection):
    """Plain PyTorch twin of `lora_qkv`."""
    return tuple(lora_linear_reference(x, p) for p in (q, k, v))


def lora_mlp_reference(x: torch.Tensor, gate: Projection, up: Projection, down: Projection):
    """Plain PyTorch twin of `lora_mlp`."""
    h = F.silu(lora_linear_reference(x, gate)) * lora_linear_reference(x, up)
    return lora_linear_reference(h, down)
