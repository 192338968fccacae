"""Optimizer, learning-rate schedule, and the optimizer state as safetensors + JSON.

The schedule is a pure function of the step (transformers' warmup schedules), rebuilt at the
cursor's step on resume, so the learning rate continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from state_schema import RunSpec

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"


def make_optimizer(spec: RunSpec, params: list[torch.nn.Parameter], device_type: str):
    train = spec.train
    kwargs = dict(lr=train.lr, weight_decay=train.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if train.optimizer == "adamw_8bit" and device_type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    if train.optimizer == "adamw_8bit":
        log.warning("adamw_8bit runs on CUDA only; using torch AdamW (fp32 states) on %s",
                 device_type)
    # foreach=False: one code path on every device keeps CPU resumes bit-identical.
    return torch.optim.AdamW(params, foreach=False, **kwargs)


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


def save_optimizer(optimizer, out_dir: Path) -> Path:
    """Tensors to safetensors; hyper-parameters and scalars in its JSON metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
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
    state: dict[int, dict] = {}
    for key, value in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
