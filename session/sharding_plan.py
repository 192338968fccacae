"""How a multi-GPU session splits the model: DDP (a whole base on each GPU) or FSDP (sharded).

`train.sharding: auto` takes DDP when plan's one-GPU estimate fits the GPU (DDP needs no
gathers, so it is the faster of the two), FSDP otherwise. The per-rank estimate of a sharded
session is here too, beside plan.py's one-GPU estimate it extends, with its formula:

    per rank = (base weights / N  +  gathered groups  +  LoRA and optimizer (replicated)
                + activations + logits) * 1.10 + 0.75 GiB CUDA context

The gathered groups are the largest unit FSDP2 gathers (a decoder layer's NF4 bytes, or the
16-bit input or output embedding when they are untied) plus one decoder layer: FSDP2 prefetches
the next layer's gather while the current group computes. The activations and logits
are plan.py's (per micro-batch, the same on every rank).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from baton.state_schema import RunConfig

from .plan import (CUDA_OVERHEAD_BYTES, FRAGMENTATION, GIB, HALF,
                   NF4_BYTES_PER_PARAM, _hidden, estimate_vram)

log = logging.getLogger("baton.session")

SHARDED_ROWS = {"2×T4 sharded": ("T4-16GB", 2)}  # the fits table's sharded rows: GPU, count


def gathered_group_bytes(cfg, params: dict[str, int], config: RunConfig) -> int:
    """What FSDP2 holds gathered at once: the largest group (a decoder layer, or an untied
    embedding) and the decoder layer it prefetches meanwhile."""
    H, L, V = _hidden(cfg), cfg.num_hidden_layers, cfg.vocab_size
    per_weight = NF4_BYTES_PER_PARAM if config.model.load_in_4bit else HALF
    layer = params["quantized"] / max(L, 1) * per_weight
    embedding = 0 if getattr(cfg, "tie_word_embeddings", False) else V * H * HALF
    return int(max(layer, embedding) + layer)


def estimate_sharded(cfg, params: dict[str, int], config: RunConfig, world: int) -> dict[str, int]:
    """Peak memory of one rank of a sharded session over `world` GPUs, by part (bytes)."""
    one = estimate_vram(cfg, params, config)
    parts = {
        "weights_shard": one["weights"] // world,
        "gathered": gathered_group_bytes(cfg, params, config),
        "lora_and_optimizer": one["lora_and_optimizer"],  # replicated on every rank
        "activations": one["activations"],
        "logits": one["logits"],
    }
    parts["total"] = int(sum(parts.values()) * FRAGMENTATION) + CUDA_OVERHEAD_BYTES
    return parts


def sharded_rows(cfg, params: dict[str, int], config: RunConfig,
                 table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fits table's sharded rows: the per-rank estimate against one GPU's memory. The
    throughput guess is the single GPU's row times the GPUs (each trains its share of a step;
    the gathers are not counted: a guess, as the rest of the table)."""
    rows = {}
    for name, (gpu, count) in SHARDED_ROWS.items():
        per_rank = estimate_sharded(cfg, params, config, count)["total"]
        one = table[gpu]
        row: dict[str, Any] = {"memory_bytes": one["memory_bytes"], "fits": per_rank <= one[
            "memory_bytes"], "per_rank_bytes": per_rank, "gpus": count,
            "tokens_per_s_guess": round(one["tokens_per_s_guess"] * count, 1)}
        if "train_hours_guess" in one:
            row["train_hours_guess"] = round(one["train_hours_guess"] / count, 2)
            row["sessions_guess"] = max(1, -(-one["sessions_guess"] // count))
        rows[name] = row
    return rows


def choose_sharding(config: RunConfig, world: int, gpu_memory: Optional[int]) -> str:
    """ddp or fsdp for this session: as configured, or for `auto` by plan's one-GPU estimate
    against `gpu_memory` (None, as on the CPU: ddp)."""
    mode = config.train.sharding
    if world == 1 or mode != "auto":
        return "ddp" if world == 1 else mode
    if gpu_memory is None:
        return "ddp"
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
