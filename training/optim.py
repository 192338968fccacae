"""Optimizer, learning-rate schedule, and the optimizer state as safetensors + JSON.

The schedule is a pure function of the step (transformers' warmup schedules), rebuilt at the
cursor's step on resume, so the learning rate continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from baton.state_schema import RunSpec

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"


# bitsandbytes' 8-bit optimizers run on CUDA and, since 0.48, on the CPU.
EIGHT_BIT_DEVICES = ("cuda", "cpu")


def make_optimizer(spec: RunSpec, params: list[torch.nn.Parameter], device_type: str):
    train = spec.train
    kwargs = dict(lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if train.optimizer == "adamw_8bit":
        eight_bit = _adamw_8bit(device_type)
        if eight_bit is not None:
            return eight_bit(params, **kwargs)
        log.warning("adamw_8bit is not available on %s (bitsandbytes missing or without "
                    "support there); using torch AdamW (fp32 states)", device_type)
    # foreach=False: one code path on every device keeps CPU resumes bit-identical.
    return torch.optim.AdamW(params, foreach=False, **kwargs)


def _adamw_8bit(device_type: str):
    if device_type not in EIGHT_BIT_DEVICES:
        return None
    try:
        import bitsandbytes as bnb
    except ImportError:  # a third-party package: the run goes on with torch's AdamW
        return None
    return bnb.optim.AdamW8bit


def warmup_steps(spec: RunSpec, total: int) -> int:
    warmup = spec.train.warmup
    # A warmup above 1 is a number of steps; at or below 1 a fraction of the run.
    return int(warmup) if warmup > 1 else math.ceil(warmup * total)


def make_scheduler(spec: RunSpec, optimizer, total: int, step: int):
    """The schedule positioned so that the next optimizer step uses the lr of `step`."""
    from transformers import (get_constant_schedule_with_warmup,
                              get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    for group in optimizer.param_groups:
        group["initial_lr"] = spec.train.lr
    warmup = warmup_steps(spec, total)
    last = step - 1  # LambdaLR steps once on construction, landing on `step`
    if spec.train.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup, last_epoch=last)
    make = {"linear": get_linear_schedule_with_warmup,
            "cosine": get_cosine_schedule_with_warmup}[spec.train.schedule]
    return make(optimizer, warmup, total, last_epoch=last)


def _flatten(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """'<param index>.<name>' keys; a nested dict (bitsandbytes keeps its 8-bit state, qmaps
    and absmax in one) one level down as '<index>.<name>.<key>'. A tensor whose storage an
    earlier one holds is copied: AdamW8bit shares one qmap among its parameters, and
    safetensors refuses shared storage (on a GPU `.cpu()` copies anyway; on the CPU it does
    not)."""
    tensors, scalars, seen = {}, {}, set()
    for index, values in state.items():
        for name, value in values.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in items:
                key = f"{index}.{name}" if sub is None else f"{index}.{name}.{sub}"
                if isinstance(item, torch.Tensor):
                    tensor = item.detach().cpu().contiguous()
                    storage = tensor.untyped_storage().data_ptr()
                    tensors[key] = tensor.clone() if storage in seen else tensor
                    seen.add(storage)
                else:
                    scalars[key] = item
    return tensors, scalars


def _unflatten(entries: dict[str, Any]) -> dict[int, dict]:
    state: dict[int, dict] = {}
    for key, value in entries.items():
        index, name, *sub = key.split(".", 2)
        slot = state.setdefault(int(index), {})
        if sub:
            slot.setdefault(name, {})[sub[0]] = value
        else:
            slot[name] = value
    return state


def save_optimizer(optimizer, out_dir: Path) -> Path:
    """Tensors to safetensors; hyper-parameters and scalars in its JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = _flatten(state["state"])
    meta = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars),
            "optimizer": type(optimizer).__name__}
    path = Path(out_dir) / OPTIMIZER_FILE
    save_file(tensors, str(path), metadata=meta)
    return path


class OptimizerStateError(ValueError):
    """The saved optimizer state does not fit this run's optimizer."""


def load_optimizer(optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    if meta.get("optimizer") != type(optimizer).__name__:
        raise OptimizerStateError(
            f"{path} holds {meta.get('optimizer')} state but this session uses "
            f"{type(optimizer).__name__} (the run moved between CPU and GPU)")
    state = _unflatten({**load_file(str(path)), **json.loads(meta["scalars"])})
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
