"""Swap Baton's kernels into HF causal LMs, plain or PEFT-wrapped.

The families and the class names patched in each are the one table in `kernels.architectures`;
the forwards bound onto their modules are `kernels.patch_ops`'.

What is replaced, never by rewriting source text:
- RMSNorm modules, QK-norm included (Qwen3, OLMo 2, Gemma 3 keep q_norm/k_norm as modules of
  the same class): their `forward` is rebound to the Triton RMSNorm in the family's casts
  (Gemma's (1 + w); weights untouched, so state dicts and optimizer references do not change);
- the rotary application: the modeling module's global `apply_rotary_pos_emb`, which the
  attention forward looks up at call time, becomes the Triton RoPE (partial rotary and the
  scalings HF builds into cos/sin included). This one is process-wide for that architecture
  (as in Liger-Kernel); it falls back to HF's own function on tensors a Triton kernel cannot
  run on, and `restore_rope()` puts the original back;
- the MLP: `forward` rebound to down_proj(act(gate) * up) on the SwiGLU (SiLU) or GeGLU
  (Gemma's tanh GELU) kernel, with gate and up from a merged gate_up_proj where the family has
  one (Phi-3, GLM-4);
- the causal-LM loss: the model's `forward` is rebound so that, when labels are given, the
  loss comes from the chunked fused linear cross-entropy and no [tokens, vocab] logits are
  built; `logits` is then None. Without labels the original forward runs and returns logits.
  Gemma's final-logit softcap and Granite's logits_scaling go to the fused loss
  (`logit_transforms`); a forward that does anything else to its logits keeps HF's loss;
- then, on the Triton path, `kernels.lora_patch.patch_peft_lora(model, "triton")` for the
  fused LoRA projections, which does not depend on the family.

A model outside the table gets the fused loss (when its forward is HF's plain lm_head then
loss) and the fused LoRA projections; `KernelReport.unfused` names every op that stays HF's,
with why, for the start line and `status`.

On the "reference" path (CPU, P100, V100) only the loss is patched, with the plain-torch
chunked cross-entropy: it is the one change that saves memory without Triton (a 128k
vocabulary's fp32 logits are several GiB); the other references would only add overhead
over HF's own modules.

With `BATON_KERNELS=none` (`kernels.dispatch.patching_enabled()` False) nothing is patched
and the report's path is "none".
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from baton.kernels.architectures import ARCHITECTURES, Architecture
from baton.kernels.dispatch import BACKENDS, NO_PATCHING, patching_enabled, select_backend
from baton.kernels.patch_ops import gated_activation, mlp_forward, norm_forward, rebind, rope_function

log = logging.getLogger(__name__)

_ORIGINAL_ROPE: dict[str, Any] = {}


@dataclass
class KernelReport:
    path: str  # "triton" | "reference": the backend chosen; "none": BATON_KERNELS=none
    patched: list[str] = field(default_factory=list)  # ops swapped in, e.g. ["rmsnorm", "rope"]
    modules: dict[str, int] = field(default_factory=dict)  # op -> how many modules it replaced
    architecture: str = ""  # model_type, or "" when the model is not one this file knows
    lora_modules: list[str] = field(default_factory=list)  # modules kernels.lora_patch fused
    # op -> why it stays HF's on this path (the family's reason, not the backend's choice)
    unfused: dict[str, str] = field(default_factory=dict)

    def unfused_text(self) -> str:
        """'rope (GLM-4 rotates interleaved pairs), ...' for the start line; '' when none."""
        return ", ".join(f"{op} ({why})" for op, why in self.unfused.items())


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


# --- the loss ---------------------------------------------------------------------------


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


def _make_causal_lm_forward(backend: str, transforms: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None or not _plain_lm_head(self.lm_head):
            return type(self).forward(
                self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        if past_key_values is not None:  # transformers 5 calls it `cache`; pass what came
            kwargs["past_key_values"] = past_key_values
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        loss = causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels, backend, kwargs,
                              **transforms)
        out = CausalLMOutputWithPast(
            loss=loss, logits=None, cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return out.to_tuple() if return_dict is False else out

    return forward


def logits_straight_to_loss(cls: type) -> bool:
    """For a model class outside the table: True when its forward's next statement after
    `logits = self.lm_head(...)` starts the loss (nothing scales, caps or shifts the logits)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    lines = [ln.strip() for ln in source.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("logits = self.lm_head("):
            return lines[i + 1].startswith(("loss = None", "loss =", "if labels is not None"))
    return False


def config_logit_rule(config) -> tuple[Optional[dict], str]:
    """For a family of the table, from its config alone (session/plan.py asks too): (the
    fused loss's logit transforms, "") or (None, why HF's loss is kept)."""
    if getattr(config, "output_router_logits", False):
        return None, "the router's auxiliary loss joins HF's"
    return logit_transforms(config), ""


def logit_rule(lm: nn.Module, known: bool) -> tuple[Optional[dict], str]:
    """(the fused loss's logit transforms, "") or (None, why HF's loss is kept): a family of
    the table by its config; a model outside it only when its forward passes lm_head's output
    straight to the loss."""
    if not _plain_lm_head(getattr(lm, "lm_head", None)):
        return None, "lm_head is not a plain floating-point Linear"
    if known:
        return config_logit_rule(lm.config)
    if getattr(lm.config, "output_router_logits", False):
        return None, "the router's auxiliary loss joins HF's"
    if not hasattr(lm, "model") or not logits_straight_to_loss(type(lm)):
        return None, "its forward changes the logits before the loss"
    return {}, ""


def _patch_loss(lm: nn.Module, backend: str, report: KernelReport) -> None:
    transforms, why = logit_rule(lm, bool(report.architecture))
    if transforms is None:
        report.unfused["fused_linear_cross_entropy"] = why
        log.warning("keeping HF's loss (full logits): %s.", why)
        return
    lm.forward = types.MethodType(_make_causal_lm_forward(backend, transforms), lm)
    report.modules["fused_linear_cross_entropy"] = 1
    report.patched.append("fused_linear_cross_entropy")


# --- the family's ops -------------------------------------------------------------------


def _of_class(root: nn.Module, class_name: str) -> list[nn.Module]:
    return [m for m in root.modules() if type(m).__name__ == class_name]


def _patch_rope(arch: Architecture) -> None:
    modeling = importlib.import_module(arch.modeling_module)
    current = modeling.apply_rotary_pos_emb
    if hasattr(current, "baton_original"):
        return  # already ours
    _ORIGINAL_ROPE[arch.modeling_module] = current
    modeling.apply_rotary_pos_emb = rope_function(arch, current)


def restore_rope() -> None:
    """Put HF's own `apply_rotary_pos_emb` back in every patched modeling module."""
    for module_path, original in _ORIGINAL_ROPE.items():
        modeling = sys.modules.get(module_path)
        if modeling is not None:
            modeling.apply_rotary_pos_emb = original
    _ORIGINAL_ROPE.clear()


def _patch_mlp(lm: nn.Module, arch: Architecture, report: KernelReport) -> None:
    kind = gated_activation(lm.config, arch) if arch.mlp else None
    mlps = _of_class(lm, arch.mlp) if arch.mlp else []
    if kind is None or not mlps:
        what = "the experts are not Linear modules" if not mlps else (
            f"activation {getattr(lm.config, arch.activation, None)!r} has no kernel")
        report.unfused["mlp"] = what
        return
    report.modules[kind] = rebind(mlps, mlp_forward(arch, kind))


def _patch_triton_ops(lm: nn.Module, arch: Architecture, report: KernelReport) -> None:
    norms = _of_class(lm, arch.rmsnorm)
    report.modules["rmsnorm"] = rebind(norms, norm_forward(arch))
    if arch.qk_norm:
        report.modules["qk_norm"] = sum(1 for m in lm.modules()
                                        if type(getattr(m, "q_norm", None)).__name__ == arch.rmsnorm)
    if arch.rope:
        _patch_rope(arch)
        report.modules["rope"] = len(_of_class(lm, arch.attention))
    else:
        report.unfused["rope"] = f"{arch.model_type} rotates interleaved pairs"
    _patch_mlp(lm, arch, report)
    ops = ("rmsnorm", "qk_norm", "rope", "swiglu", "geglu")
    report.patched += [op for op in ops if report.modules.get(op)]


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
    lm = _causal_lm(model)
    if backend == "triton":
        if known:
            _patch_triton_ops(lm, ARCHITECTURES[known], report)
        else:
            report.unfused["rmsnorm, rope, mlp"] = f"model_type {model_type!r} is not in the table"
    if hasattr(lm, "lm_head"):  # a sequence classifier's head has no vocabulary logits
        _patch_loss(lm, backend, report)
    _patch_lora(model, backend, report)
    if report.unfused:
        log.warning("kernels: unfused %s", report.unfused_text())
    _record_path(device_info_or_device, backend)
    return report
