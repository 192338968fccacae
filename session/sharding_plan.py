"""How a multi-GPU session splits the model: DDP (a whole base on each GPU) or FSDP (sharded).

`train.sharding: auto` takes DDP when plan's one-GPU estimate fits the GPU (DDP needs no
gathers, so it is the faster of the two), FSDP otherwise. plan.py's `estimate_sharded` is the
per-rank estimate of a sharded session, its fits table's "2×T4 sharded" row.
"""

from __future__ import annotations

import logging
from typing import Optional

from baton.state_schema import RunConfig

from .plan import GIB, estimate_vram

log = logging.getLogger("baton.session")


def choose_sharding(config: RunConfig, world: int, gpu_memory: Optional[int]) -> str:
    """ddp or fsdp for this session: as configured, or for `auto` by plan's one-GPU estimate
    against `gpu_memory` (None, as on the CPU: ddp)."""
    mode = config.train.sharding
    if world == 1 or mode != "auto":
        return "ddp" if world == 1 else mode
    if gpu_memory is None or not config.model.load_in_4bit or config.task != "causal_lm":
        return "ddp"  # the CPU; or a run fsdp cannot shard (a 16-bit base, a classifier)
    need = one_gpu_estimate(config)
    choice = "ddp" if need is None or need <= gpu_memory else "fsdp"
    log.info("train.sharding auto: %s (estimate %.2f GiB a GPU without sharding, %.2f GiB "
             "available)", choice, (need or 0) / GIB, gpu_memory / GIB)
    return choice


def one_gpu_estimate(config: RunConfig) -> Optional[int]:
    """plan's one-GPU peak for `config` (the model's config.json only), None if unreadable."""
    from .plan import PlanError, count_params, load_model_config, meta_lora_model

    try:
        cfg = load_model_config(config.model.name, config.model.revision)
        params = count_params(meta_lora_model(cfg, config.lora))
    except PlanError as exc:
        log.warning("train.sharding auto: no estimate (%s); ddp", exc)
        return None
    return estimate_vram(cfg, params, config)["total"]


def gpu_memory() -> Optional[int]:
    """This rank's GPU memory in bytes; None on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
