"""Route a PEFT LoRA model's attention and MLP through the fused functions of `kernels.lora`.

Nothing is rewritten: attention modules with separate q/k/v LoRA layers, the SwiGLU MLPs of
the architectures in `kernels.architectures`, and every other LoRA Linear (a merged qkv_proj
or gate_up_proj, any architecture's projections) get a new bound `forward` on the instance, which calls the fused
function when every layer it needs fits (NF4 or dense base, one active adapter, no dropout,
no DoRA, no lora_bias) and the model's own forward otherwise. `unpatch_peft_lora` removes
them again. The checks run on every call, since PEFT state can change after patching.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager

import torch
from torch import nn

from baton.kernels.architectures import MLP_CLASSES, SILU_ACTIVATIONS
from baton.kernels.dispatch import launchable
from baton.kernels.lora import Projection, lora_linear, lora_mlp, lora_qkv

_MARK = "_baton_lora"  # set on every forward this module installs, so patching is idempotent

log = logging.getLogger(__name__)


def _base_kind(base: nn.Module) -> str | None:
    """'nf4' or 'dense' for a base layer the fused functions can read, else None."""
    if _is_bnb_linear4bit(base):
        return "nf4" if getattr(base.weight, "quant_type", None) == "nf4" else None
    if type(base) is nn.Linear:
        return "dense"
    return None


def _is_bnb_linear4bit(module: nn.Module) -> bool:
    # Looked up by name so that importing this file never imports bitsandbytes.
    return any(
        c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
        for c in type(module).__mro__
    )


def lora_skip_reason(layer: nn.Module) -> str | None:
    """Why a PEFT LoRA layer cannot go through the fused functions, or None when it can."""
    if not hasattr(layer, "lora_A") or not hasattr(layer, "get_base_layer"):
        return f"{type(layer).__name__} is not a PEFT LoRA layer"
    active = list(layer.active_adapters)
    if len(active) != 1 or active[0] not in layer.lora_A:
        return f"needs exactly one active adapter, has {active}"
    name = active[0]
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        return f"lora_dropout is {dropout.p}; the fused path supports dropout 0 only"
    if layer.use_dora.get(name, False) or name in getattr(layer, "lora_variant", {}):
        return "DoRA or another LoRA variant is not supported by the fused path"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True is not supported by the fused path"
    base = layer.get_base_layer()
    if _base_kind(base) is None:
        kind = type(base).__name__
        return f"base layer {kind} is neither a bitsandbytes NF4 Linear4bit nor an nn.Linear"
    if base.weight.requires_grad or not isinstance(layer.lora_A[name], nn.Linear):
        return "base weight is trainable or the adapter is not a linear LoRA"
    return None


def _projection(layer: nn.Module) -> Projection | None:
    """The layer as a Projection, or None if it cannot run fused right now.

    Checked on every call because PEFT state changes after patching: `disable_adapter()`,
    `merge_adapter()`, `set_adapter()`, or bitsandbytes repacking a weight for its AVX-512 CPU
    kernel (which it does in place on an eval-mode, no-grad CPU forward).
    """
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A:
        return None
    base = layer.get_base_layer()
    quant_state = None
    if _base_kind(base) == "nf4":
        # bitsandbytes keeps a module-level copy for when the parameter loses its own.
        quant_state = getattr(base.weight, "quant_state", None)
        quant_state = quant_state or getattr(base, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            return None
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    scaling = float(layer.scaling[name])
    return Projection(base.weight, quant_state, base.bias, lora_a, lora_b, scaling)


def _projections(*layers: nn.Module) -> list[Projection] | None:
    projs = [_projection(layer) for layer in layers]
    return None if any(p is None for p in projs) else projs


def _install(module: nn.Module, impl) -> None:
    """Give `module` a forward that runs `impl(module, original_forward, *args, **kwargs)`."""
    if getattr(module.__dict__.get("forward"), _MARK, False):
        return
    previous = module.__dict__.get("forward")  # an instance forward someone set before us

    def forward(self, *args, **kwargs):
        # The class's forward is looked up on every call, so a later patch of the class
        # (or a swap of the instance's class) still takes effect under ours.
        original = previous if previous is not None else types.MethodType(type(self).forward, self)
        return impl(self, original, *args, **kwargs)

    setattr(forward, _MARK, True)
    forward._baton_previous = previous
    module.forward = types.MethodType(forward, module)


def _linear_forward(layer, original, x, *args, **kwargs):
    p = _projection(layer) if launchable(x) else None
    if p is None or args or kwargs:
        return original(x, *args, **kwargs)
    return lora_linear(x, p)


def _mlp_forward(mlp, original, x, *args, **kwargs):
    projs = _projections(mlp.gate_proj, mlp.up_proj, mlp.down_proj) if launchable(x) else None
    if projs is None or args or kwargs:
        return original(x, *args, **kwargs)
    return lora_mlp(x, *projs)


def _attention_forward(attn, original, *args, **kwargs):
    # Q, K and V come from one fused call; the model's own attention code then runs unchanged
    # (RoPE, KV cache, attention backend, sliding window) and gets them from q/k/v_proj.
    hidden = args[0] if args else kwargs.get("hidden_states")
    fits = hidden is not None and launchable(hidden)
    projs = _projections(attn.q_proj, attn.k_proj, attn.v_proj) if fits else None
    if projs is None:
        return original(*args, **kwargs)
    q, k, v = lora_qkv(hidden, *projs)
    with (
        _serving(attn.q_proj, hidden, q),
        _serving(attn.k_proj, hidden, k),
        _serving(attn.v_proj, hidden, v),
    ):
        return original(*args, **kwargs)


@contextmanager
def _serving(layer: nn.Module, x: torch.Tensor, out: torch.Tensor):
    """For one call of the attention, `layer(x)` returns `out` instead of computing it."""
    previous = layer.__dict__.get("forward")
    compute = layer.forward

    def forward(inp, *args, **kwargs):
        return out if inp is x and not args and not kwargs else compute(inp, *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous


def _is_one_of(module: nn.Module, names: frozenset) -> bool:
    # By class name along the MRO, so a subclass swapped in by another patch still matches.
    return any(c.__name__ in names for c in type(module).__mro__)


def _is_silu(mlp: nn.Module) -> bool:
    act = getattr(getattr(mlp, "config", None), "hidden_act", None)
    if isinstance(act, str):
        return act in SILU_ACTIVATIONS
    return "silu" in type(getattr(mlp, "act_fn", None)).__name__.lower()


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def _group_of(module: nn.Module):
    """(member names, fused forward) when `module` is an attention with separate LoRA q/k/v
    (any architecture: its forward runs unchanged and is served Q, K and V), or a SwiGLU MLP of
    the table with gate/up/down; None otherwise."""
    if all(_is_lora_layer(getattr(module, n, None)) for n in QKV):
        return QKV, _attention_forward
    if _is_one_of(module, MLP_CLASSES) and _is_silu(module) and all(
            _is_lora_layer(getattr(module, n, None)) for n in GATE_UP_DOWN):
        return GATE_UP_DOWN, _mlp_forward
    return None


def _log_skipped(skipped: dict[str, str]) -> None:
    if not skipped:
        return
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        log.warning(
            "fused LoRA not used for %d layer(s) (e.g. %s): %s", len(names), names[0], reason
        )


def _patch_one(name: str, module: nn.Module, grouped: set, skipped: dict[str, str]) -> list[str]:
    """A fused group (its members then run inside it), or one LoRA layer on its own: every
    LoRA Linear of any architecture, merged ones included (Phi-3's qkv_proj and gate_up_proj,
    GLM-4's gate_up_proj), goes through `LoRALinearFunction`."""
    group = _group_of(module)
    if group is not None:
        members, impl = group
        if all(lora_skip_reason(getattr(module, n)) is None for n in members):
            _install(module, impl)
            grouped.update(f"{name}.{n}" for n in members)
            return [name]
    if name in grouped or not _is_lora_layer(module):
        return []
    reason = lora_skip_reason(module)
    if reason is not None:
        skipped[name] = reason
        return []
    _install(module, _linear_forward)
    return [name]


def patch_peft_lora(
    model: nn.Module, backend: str, skipped: dict[str, str] | None = None
) -> list[str]:
    """Route a PEFT LoRA model's attention and MLP projections through the fused functions.

    Q/K/V through `LoRAQKVFunction` (any attention with separate q/k/v LoRA layers),
    gate/up/down with SwiGLU through `LoRAMLPFunction` (the MLPs of `kernels.architectures`),
    and every other LoRA Linear, merged projections included, through `LoRALinearFunction`,
    by giving those modules new bound `forward` methods. Layers that do not fit (dropout > 0, several
    active adapters, DoRA, lora_bias, a base that is neither NF4 nor nn.Linear) keep PEFT's path
    and are logged, and added to `skipped` (name -> reason) when a dict is given. On "reference"
    nothing is patched. Returns the names of the patched modules. Safe to call twice.
    """
    if backend not in ("triton", "reference"):
        raise ValueError(f"backend must be 'triton' or 'reference', not {backend!r}")
    if backend == "reference":
        return []
    skipped = {} if skipped is None else skipped
    patched: list[str] = []
    grouped: set[str] = set()
    for name, module in model.named_modules():
        patched += _patch_one(name, module, grouped, skipped)
    _log_skipped(skipped)
    return patched


def unpatch_peft_lora(model: nn.Module) -> list[str]:
    """Undo `patch_peft_lora`: restore every forward it replaced. Returns the modules restored."""
    restored = []
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if getattr(forward, _MARK, False):
            previous = forward._baton_previous
            if previous is None:
                del module.forward
            else:
                module.forward = previous
            restored.append(name)
    return restored
