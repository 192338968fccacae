"""Swap Baton's kernels into HF causal LMs, plain or PEFT-wrapped.

The architectures (Llama, Mistral, Qwen2) and the class names patched in each are the one
table in `kernels.architectures`.

What is replaced, never by rewriting source text:
- RMSNorm modules: their `forward` is rebound to the Triton RMSNorm (weights untouched, so
  state dicts and optimizer references do not change);
- the rotary application: the modeling module's global `apply_rotary_pos_emb`, which the
  attention forward looks up at call time, becomes the Triton RoPE. This one is process-wide
  for that architecture (as in Liger-Kernel); it falls back to HF's own function on tensors a
  Triton kernel cannot run on, and `restore_rope()` puts the original back;
- the MLP: `forward` rebound to down_proj(swiglu(gate_proj(x), up_proj(x))) when the
  activation is SiLU;
- the causal-LM loss: the model's `forward` is rebound so that, when labels are given, the
  loss comes from the chunked fused linear cross-entropy and no [tokens, vocab] logits are
  built; `logits` is then None. Without labels the original forward runs and returns logits.
- then, on the Triton path, `kernels.lora_patch.patch_peft_lora(model, "triton")` for the
  fused LoRA projections.

On the "reference" path (CPU, P100, V100) only the loss is patched, with the plain-torch
chunked cross-entropy: it is the one change that saves memory without Triton (a 128k
vocabulary's fp32 logits are several GiB); the other references would only add overhead
over HF's own modules.

With `BATON_KERNELS=none` (`kernels.dispatch.patching_enabled()` False) nothing is patched
and the report's path is "none".
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels.architectures import (
    ARCHITECTURES, SILU_ACTIVATIONS, Architecture, known_architectures,
)
from baton.kernels.dispatch import BACKENDS, NO_PATCHING, launchable, patching_enabled, select_backend

log = logging.getLogger(__name__)

_ORIGINAL_ROPE: dict[str, Any] = {}


@dataclass
class KernelReport:
    path: str  # "triton" | "reference": the backend chosen; "none": BATON_KERNELS=none
    patched: list[str] = field(default_factory=list)  # ops swapped in, e.g. ["rmsnorm", "rope"]
    modules: dict[str, int] = field(default_factory=dict)  # op -> how many modules it replaced
    architecture: str = ""  # model_type, or "" when the model is not one this file knows
    lora_modules: list[str] = field(default_factory=list)  # modules kernels.lora_patch fused


def _device_of(device_info_or_device: Any, model: nn.Module) -> torch.device:
    if isinstance(device_info_or_device, (torch.device, str)):
        return torch.device(device_info_or_device)
    device = getattr(device_info_or_device, "device", None)
    if device is None and isinstance(device_info_or_device, dict):
        device = device_info_or_device.get("device")
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


def _backend_for(device_info_or_device: Any, device: torch.device) -> str:
    # A backend already chosen and recorded for this session wins: chosen once, used everywhere.
    recorded = getattr(device_info_or_device, "kernels", None)
    return recorded if recorded in BACKENDS else select_backend(device)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The HF *ForCausalLM inside a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --- replacement forwards ---------------------------------------------------------------


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from baton.kernels.rmsnorm import rmsnorm, rmsnorm_reference

    if not launchable(hidden_states):
        return rmsnorm_reference(hidden_states, self.weight, self.variance_epsilon)
    return rmsnorm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    from baton.kernels.swiglu import swiglu, swiglu_reference

    gate, up = self.gate_proj(x), self.up_proj(x)
    fits = launchable(gate) and gate.dtype == up.dtype
    h = swiglu(gate, up) if fits else swiglu_reference(gate, up)
    return self.down_proj(h)


def _make_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not launchable(q):
            return original(q, k, cos, sin, unsqueeze_dim)
        from baton.kernels.rope import apply_rope

        return apply_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.baton_original = original
    return apply_rotary_pos_emb


def _plain_lm_head(lm_head: nn.Module) -> bool:
    # A LoRA-wrapped or 4-bit lm_head keeps HF's path: the fused loss reads the weight directly.
    weight = getattr(lm_head, "weight", None)
    return (
        isinstance(lm_head, nn.Linear) and not hasattr(lm_head, "base_layer")
        and weight is not None and weight.dtype.is_floating_point
    )


def logit_transforms(config) -> dict:
    """The final-logit transforms a config asks for, as the fused CE's keyword arguments:
    Gemma 2/3's `final_logit_softcapping`, Granite's `logits_scaling` (logits divided by it)."""
    scaling = getattr(config, "logits_scaling", None) or 1.0
    return {"softcap": getattr(config, "final_logit_softcapping", None) or None,
            "logit_scale": 1.0 / float(scaling)}


def causal_lm_loss(hidden, lm_head, labels, backend, kwargs, softcap=None,
                   logit_scale=1.0) -> torch.Tensor:
    """HF's ForCausalLMLoss (shift, ignore_index, num_items_in_batch) over the fused CE."""
    from baton.kernels.cross_entropy import fused_linear_cross_entropy

    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    # Rows whose label is ignored (prompt tokens, padding) need no logits at all.
    keep = shift_labels != ignore_index
    hidden, shift_labels = hidden[keep], shift_labels[keep]
    n_items = kwargs.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(
        hidden, lm_head.weight, shift_labels, bias=lm_head.bias, ignore_index=ignore_index,
        reduction="mean" if n_items is None else "sum", backend=backend,
        softcap=softcap, logit_scale=logit_scale,
    )
    if n_items is not None:
        loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
    return loss


def _make_causal_lm_forward(backend: str):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None or not _plain_lm_head(self.lm_head):
            return type(self).forward(
                self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, backend, kwargs,
                              **logit_transforms(self.config))
        out = CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out.to_tuple() if return_dict is False else out

    return forward


# --- patching ---------------------------------------------------------------------------


def _rebind(modules: list[nn.Module], fn) -> int:
    for module in modules:
        module.forward = types.MethodType(fn, module)
    return len(modules)


def _of_class(root: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in root.modules() if type(m).__name__ == class_name]


def _patch_rope(module_path: str) -> None:
    modeling = importlib.import_module(module_path)
    current = modeling.apply_rotary_pos_emb
    if hasattr(current, "baton_original"):
        return  # already ours
    _ORIGINAL_ROPE[module_path] = current
    modeling.apply_rotary_pos_emb = _make_rope(current)


def restore_rope() -> None:
    """Put HF's own `apply_rotary_pos_emb` back in every patched modeling module."""
    for module_path, original in _ORIGINAL_ROPE.items():
        modeling = sys.modules.get(module_path)
        if modeling is not None:
            modeling.apply_rotary_pos_emb = original
    _ORIGINAL_ROPE.clear()


def _patch_triton_ops(lm: nn.Module, arch: Architecture, report: KernelReport) -> None:
    report.modules["rmsnorm"] = _rebind(_of_class(lm, arch.rmsnorm), _rmsnorm_forward)
    _patch_rope(arch.modeling_module)
    report.modules["rope"] = len(_of_class(lm, arch.attention))
    if getattr(lm.config, "hidden_act", None) in SILU_ACTIVATIONS:
        report.modules["swiglu"] = _rebind(_of_class(lm, arch.mlp), _swiglu_mlp_forward)
    report.patched += [op for op in ("rmsnorm", "rope", "swiglu") if report.modules.get(op)]


def _patch_loss(lm: nn.Module, backend: str, report: KernelReport) -> None:
    if not _plain_lm_head(getattr(lm, "lm_head", None)):
        log.warning("lm_head is not a plain floating-point Linear; "
                    "keeping HF's loss (full logits).")
        return
    lm.forward = types.MethodType(_make_causal_lm_forward(backend), lm)
    report.modules["fused_linear_cross_entropy"] = 1
    report.patched.append("fused_linear_cross_entropy")


def _patch_lora(model: nn.Module, backend: str, report: KernelReport) -> None:
    if backend != "triton":
        return  # the reference path keeps PEFT's own LoRA layers (patch_peft_lora patches none)
    # Imported here, like the other kernel modules, so the reference path never imports Triton;
    # on the Triton path a missing or broken module is an error, not a silent fallback.
    from baton.kernels.lora_patch import patch_peft_lora

    report.lora_modules = list(patch_peft_lora(model, backend))
    if report.lora_modules:
        report.modules["fused_lora"] = len(report.lora_modules)
        report.patched.append("fused_lora")


def _model_type(model: nn.Module) -> str:
    """config.model_type of the causal LM inside `model`, "" when it has none."""
    return getattr(getattr(_causal_lm(model), "config", None), "model_type", "")


def _record_path(device_info_or_device: Any, path: str) -> None:
    if hasattr(device_info_or_device, "kernels"):
        device_info_or_device.kernels = path


def patch_model(model: nn.Module, device_info_or_device: Any) -> KernelReport:
    """Patch `model` (an HF causal LM, or a PEFT model wrapping one) in place for this device.

    `device_info_or_device`: a torch.device, a device string, or an object (training's
    DeviceInfo) with `.device`; its `.kernels`, when already "triton" or "reference", is
    used as the choice, and is set to the chosen path otherwise. With `BATON_KERNELS=none`
    nothing is patched, the report's path is "none" and `.kernels` is set to "none".
    """
    model_type = _model_type(model)
    known = model_type if model_type in ARCHITECTURES else ""
    if not patching_enabled():
        _record_path(device_info_or_device, NO_PATCHING)
        return KernelReport(path=NO_PATCHING, architecture=known)
    backend = _backend_for(device_info_or_device, _device_of(device_info_or_device, model))
    report = KernelReport(path=backend, architecture=known)
    if known:
        lm = _causal_lm(model)
        if backend == "triton":
            _patch_triton_ops(lm, ARCHITECTURES[known], report)
        if hasattr(lm, "lm_head"):  # a sequence classifier's head has no vocabulary logits
            _patch_loss(lm, backend, report)
    else:
        log.warning("model_type %r is not one of %s: no kernels patched.",
                    model_type, known_architectures())
    _patch_lora(model, backend, report)
    _record_path(device_info_or_device, backend)
    return report
