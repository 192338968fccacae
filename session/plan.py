"""`agent.py plan`: what a run will cost, from its config and the model's config.json alone.

The model is built on the meta device (shapes, no storage) and PEFT attaches LoRA there, so
the trainable-parameter count is PEFT's own, for any architecture transformers knows, and no
weights are downloaded. Memory and time are estimates: the formulas are stated beside the
code and the per-GPU throughput is a guess from peak FLOPs, not a measurement.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from baton.state_schema import RunConfig, parse_duration
from baton.state_schema.fields import task_of
from baton.training.columns import map_records, resolve_columns
from baton.training.data import DataError, read_records
from baton.training.order import split_eval, total_steps

from .codes import DEFAULT_SESSION_LIMIT_S, INVALID, OK

GIB = 1024**3
# NF4 (bitsandbytes, double quantization): 4 bits a weight, one 8-bit absmax per block of 64,
# and one fp32 absmax-of-absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
HALF = 2  # bf16/fp16 bytes: non-quantized base weights (embeddings, norms, lm_head)
ADAM_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}  # two moments: fp32 each, or 8-bit each
# A chunked cross-entropy materializes logits for at most this many tokens at a time.
LOGITS_CHUNK_TOKENS = 2048
CUDA_OVERHEAD_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
FRAGMENTATION = 1.10
SESSION_SETUP_S = 10 * 60  # install, model download and load, first compile: a guess
CHARS_PER_TOKEN = 4.0  # a guess for English text and code without loading the tokenizer

# GPU classes a free-tier user meets: memory, and dense fp16/bf16 tensor peak FLOP/s.
# `mfu` is a guessed fraction of peak a QLoRA step reaches (dequantization, small matmuls).
GPU_CLASSES: dict[str, dict[str, float]] = {
    "P100-16GB": {"memory": 16 * GIB, "peak_flops": 18.7e12, "mfu": 0.30},
    "T4-16GB": {"memory": 15 * GIB, "peak_flops": 65e12, "mfu": 0.25},
    "L4-24GB": {"memory": 22.5 * GIB, "peak_flops": 121e12, "mfu": 0.30},
    "A100-40GB": {"memory": 40 * GIB, "peak_flops": 312e12, "mfu": 0.35},
    "A100-80GB": {"memory": 80 * GIB, "peak_flops": 312e12, "mfu": 0.35},
    "H100-80GB": {"memory": 80 * GIB, "peak_flops": 989e12, "mfu": 0.30},
}


class PlanError(ValueError):
    """The plan cannot be made: the model's config cannot be read or built."""


def load_model_config(name: str, revision: str = "main"):
    """AutoConfig from a local folder or the Hub (config.json only, never weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=None if Path(name).is_dir() else revision)
    except (OSError, ValueError) as exc:
        raise PlanError(
            f"cannot read the config of model {name!r} (revision {revision!r}): {exc}. "
            "Check model.name in run.yaml (a Hub id or a folder holding config.json); for a "
            "gated model set HF_TOKEN."
        ) from exc


def meta_lora_model(model_config, lora: Any, num_labels: Optional[int] = None):
    """The model with LoRA attached, built on the meta device: shapes only, no memory. With
    `num_labels`, the sequence classifier a classification run trains (its head in PEFT's
    modules_to_save, as the trainer builds it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from baton.training.model import lora_config, peft_model

    auto = AutoModelForCausalLM
    if num_labels is not None:
        model_config.num_labels = num_labels
        auto = AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(model_config)
        # The session's own LoRA targets (a mixture of experts: its experts, not its router).
        task_type = "CAUSAL_LM" if num_labels is None else "SEQ_CLS"
        return peft_model(model, lora_config(lora, task_type, model))


def count_params(peft_model) -> dict[str, int]:
    """Trainable (LoRA), base total, and the base weights bitsandbytes would quantize."""
    import torch

    trainable, total = peft_model.get_nb_trainable_parameters()
    base = peft_model.get_base_model()
    # transformers keeps the output embedding in 16-bit when loading in 4 bit.
    output = base.get_output_embeddings()
    # A classifier's head is trained in full (modules_to_save) and never quantized.
    head = sum(p.numel() for n, p in peft_model.named_parameters() if "modules_to_save" in n)
    quantized = sum(
        m.weight.numel() for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output and "lora_" not in name
        and not _in_head(name)
    )
    return {"trainable": trainable, "base": total - trainable, "quantized": quantized,
            "head": head}


def _in_head(name: str) -> bool:
    from baton.training.classify import HEAD_NAMES

    return any(part in HEAD_NAMES for part in name.split("."))


def adapter_bytes(peft_model) -> int:
    """Size of adapter_model.safetensors: fp32 tensors plus the JSON header (approximate)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, tensor in state.items():
        size = tensor.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header_len = len(json.dumps(header, separators=(",", ":")))
    return 8 + header_len + (-header_len % 8) + offset


def estimate_vram(cfg, params: dict[str, int], config: RunConfig) -> dict[str, int]:
    """Peak GPU memory of one training micro-step, in bytes, by part.

    weights     = Q * NF4_BYTES_PER_PARAM + (P - Q) * 2       (Q: quantized linear weights)
                  or P * 2 without 4-bit loading
    lora        = T * (4 weight + 4 grad + Adam: 8 fp32 or 2 for 8-bit)
    activations = L * m*S*H*2            hidden state kept per layer (gradient checkpointing)
                + m*S*(10*H + 4*I)*2 * 2 one layer recomputed, its activations and their grads
    logits      = min(m*S, 2048) * V * 4 * 2   one fp32 chunk of logits and its grad
                  (m*S * V * 4 * 2 where the family's loss stays HF's: session/family_plan.py)
    total       = (weights + lora + activations + logits) * 1.10 + 0.75 GiB CUDA context
    with m micro_batch_size, S max_seq_len, H hidden, I the MLP width a token spans (a mixture
    of experts: its top-k experts'), L layers, V vocab (the text config's: Gemma's 262k).
    """
    from .family_plan import fused_loss, mlp_width, text_config

    classes = getattr(cfg, "num_labels", None)
    cfg = text_config(cfg)
    P, Q, T = params["base"], params["quantized"], params["trainable"]
    m, S = config.train.micro_batch_size, config.data.max_seq_len
    H, L, V = _hidden(cfg), cfg.num_hidden_layers, cfg.vocab_size
    rows = min(m * S, LOGITS_CHUNK_TOKENS) if fused_loss(cfg) else m * S
    if config.task == "classification":
        V, rows = classes, min(m * S, LOGITS_CHUNK_TOKENS)  # one a class, not a vocabulary
    inter = mlp_width(cfg, H)
    if config.model.load_in_4bit:
        weights = Q * NF4_BYTES_PER_PARAM + (P - Q) * HALF
    else:
        weights = P * HALF
    parts = {
        "weights": weights,
        "lora_and_optimizer": T * (4 + 4 + ADAM_STATE_BYTES[config.train.optimizer]),
        "activations": L * m * S * H * HALF + m * S * (10 * H + 4 * inter) * HALF * 2,
        "logits": rows * V * 4 * 2,
    }
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = int(sum(parts.values()) * FRAGMENTATION) + CUDA_OVERHEAD_BYTES
    return parts


def _hidden(cfg) -> int:
    for attr in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise PlanError(f"the model config ({type(cfg).__name__}) names no hidden size")


def checkpoint_bytes(adapter: int, trainable: int, optimizer: str) -> dict[str, int]:
    """One checkpoint in the store: adapter, cursor and manifest; optimizer state if kept."""
    small_files = 64 * 1024  # cursor.json (RNG states, loss history), manifest, adapter_config
    state = trainable * ADAM_STATE_BYTES[optimizer] + 4096
    return {"without_optimizer": adapter + small_files,
            "with_optimizer": adapter + small_files + state}


def count_samples(path: Path, config: Optional[RunConfig] = None
                  ) -> tuple[Optional[int], Optional[float]]:
    """(samples, mean characters a sample) of the training file, read and mapped to the run's
    fields (`data.columns`) by the engine's own reader, so plan accepts exactly the files a
    session accepts; (None, None) when the file is absent or unreadable (the session would
    refuse it with the reason). A Hub dataset's split is downloaded (its files, never the
    model's weights); one the token may not read is a PlanError, exit 2."""
    if config is not None and config.data.hub is not None:
        return _hub_samples(config)
    if not path.is_file():
        return None, None
    try:
        records = read_records(path)
        if config is not None:
            data, task = config.data, task_of(config)
            fmt, columns = resolve_columns(records[0], data.columns, data.format, task,
                                           source=path)
            records = map_records(records, columns, fmt, task, source=path)
    except DataError:
        return None, None
    lengths = [sum(len(str(value)) for value in record.values()) for record in records]
    return len(lengths), (sum(lengths) / len(lengths) if lengths else 0.0)


def _hub_samples(config: RunConfig) -> tuple[Optional[int], Optional[float]]:
    from baton.training.hub_data import DatasetUnavailableError

    from .hub_source import hub_samples

    try:
        return hub_samples(config)
    except DataError as exc:
        raise PlanError(str(exc)) from None
    except DatasetUnavailableError:
        return None, None  # the notes say the samples are unknown; a session would exit 1


def steps_total(config: RunConfig, samples: Optional[int]) -> Optional[int]:
    """Optimizer steps of the run, by the engine's rule (training.order.total_steps) over the
    samples left once the engine's eval split (training.order.split_eval) is held out."""
    train = config.train
    if train.max_steps is None and samples is None:
        return None
    n_train = 0
    if samples is not None:
        fraction = config.data.eval if isinstance(config.data.eval, float) else None
        n_train = len(split_eval(samples, fraction, train.seed)[0])
    return total_steps(train.max_steps, train.epochs, train.batch_size, n_train)


def tokens_per_step(config: RunConfig, mean_chars: Optional[float]) -> int:
    """Tokens an optimizer step trains on: full sequences when packing, else the mean sample
    length in characters over CHARS_PER_TOKEN, capped at max_seq_len (a guess)."""
    S = config.data.max_seq_len
    if config.data.packing or not mean_chars:
        per_sample = S
    else:
        per_sample = min(S, max(1, int(mean_chars / CHARS_PER_TOKEN)))
    return per_sample * config.train.batch_size


def gpu_table(params: dict[str, int], vram: int, total_tokens: Optional[int],
              session_limit_s: float) -> dict[str, dict[str, Any]]:
    """Per GPU class: does it fit, a guessed tokens/s, and the sessions the run would take.

    tokens/s guess = mfu * peak_flops / (6 * base params): forward, the forward recomputed by
    gradient checkpointing, and the backward to the activations, each about 2 FLOPs a weight."""
    table = {}
    usable_s = max(session_limit_s - SESSION_SETUP_S, 60.0)
    for name, gpu in GPU_CLASSES.items():
        tps = gpu["mfu"] * gpu["peak_flops"] / (6 * max(params["base"], 1))
        row: dict[str, Any] = {
            "memory_bytes": int(gpu["memory"]),
            "fits": vram <= gpu["memory"],
            "tokens_per_s_guess": round(tps, 1),
        }
        if total_tokens is not None:
            hours = total_tokens / tps / 3600
            row["train_hours_guess"] = round(hours, 2)
            row["sessions_guess"] = math.ceil(hours * 3600 / usable_s)
        table[name] = row
    return table


def plan(config: RunConfig, *, tokens_per_s: Optional[float] = None) -> dict[str, Any]:
    """The whole plan as the `plan --json` object; `budget` (session/budget.py) bills the
    run at `tokens_per_s`, else at the rate its earlier sessions measured."""
    from .budget import plan_budget

    cfg = load_model_config(config.model.name, config.model.revision)
    labels = plan_labels(config)
    n_labels = (len(labels) or 2) if task_of(config) == "classification" else None
    peft_model = meta_lora_model(cfg, config.lora, n_labels)
    params = count_params(peft_model)
    adapter = adapter_bytes(peft_model)
    vram = estimate_vram(cfg, params, config)
    samples, mean_chars = count_samples(Path(config.data.train), config)
    steps = steps_total(config, samples)
    step_tokens = tokens_per_step(config, mean_chars)
    total_tokens = steps * step_tokens if steps is not None else None
    limit = parse_duration(config.session.limit) or DEFAULT_SESSION_LIMIT_S
    notes = _notes(config, samples, steps)
    if config.task == "classification" and not labels:
        notes.append("could not read the labels of the training data: the head is counted "
                     "for 2 classes")
    return {
        "run": config.run, "model": config.model.name,
        "architecture": type(cfg).__name__.removesuffix("Config"),
        "task": config.task, "trainable_params": params["trainable"],
        "base_params": params["base"], "head_params": params["head"], "labels": labels,
        "quantized_params": params["quantized"] if config.model.load_in_4bit else 0,
        "adapter_bytes": adapter,
        "checkpoint_bytes": checkpoint_bytes(adapter, params["trainable"], config.train.optimizer),
        "estimated_vram_bytes": vram["total"], "vram_breakdown_bytes": vram,
        "samples": samples, "steps_total": steps,
        "tokens_per_step_guess": step_tokens, "tokens_total_guess": total_tokens,
        "session_limit_s": limit,
        "gpus": _with_sharded(gpu_table(params, vram["total"], total_tokens, limit), cfg,
                              params, config),
        "budget": plan_budget(config, steps, step_tokens, tokens_per_s, limit),
        "notes": notes,
    }


def plan_labels(config: RunConfig) -> list[str]:
    """A classification run's labels as the session will read them (through data.columns, by
    the engine's reader and split); [] for a causal LM, a Hub dataset (its split is not
    downloaded twice: the head is then counted for 2 classes) or data that cannot be read (the
    session would refuse it with the reason)."""
    path = Path(config.data.train)
    if task_of(config) != "classification" or config.data.hub is not None \
            or not path.is_file():
        return []
    from baton.training.classify_data import run_labels

    data = config.data
    try:
        records = read_records(path)
        fmt, columns = resolve_columns(records[0], data.columns, data.format,
                                       "classification", source=path)
        records = map_records(records, columns, fmt, "classification", source=path)
        fraction = data.eval if isinstance(data.eval, float) else None
        return run_labels(records, fraction, config.train.seed)
    except DataError:
        return []


def _notes(config: RunConfig, samples: Optional[int], steps: Optional[int]) -> list[str]:
    notes = ["tokens/s, hours and sessions are guesses from peak FLOPs; "
             "`agent.py status` shows measured throughput once a session has run"]
    if samples is None:
        why = ("the Hub did not answer" if config.data.hub else
               "absent, or Parquet without pyarrow")
        notes.append(f"could not count samples in {config.data.train!r} ({why}): steps_total "
                     "is unknown unless train.max_steps is set")
    if steps == 0:
        notes.append("the training split is empty: add data or lower data.eval")
    return notes


def _gib(n: Optional[int]) -> str:
    """Bytes for a person: '3.85 GiB', '164.0 MiB', '67.4 KiB'."""
    if n is None:
        return "?"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def render(result: dict[str, Any], console=None) -> None:
    """The plan as rich tables for a person."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = Table(title=f"Plan for run {result['run']} ({result['model']})", show_header=False)
    for label, value in [
        ("trainable (LoRA) params", f"{result['trainable_params']:,}"),
        *([("of which the classification head", f"{result['head_params']:,} "
            f"({len(result['labels'])} labels)")] if result["task"] == "classification" else []),
        ("base params", f"{result['base_params']:,}"),
        ("adapter file", _gib(result["adapter_bytes"])),
        ("checkpoint (no / with optimizer)", " / ".join(
            _gib(v) for v in result["checkpoint_bytes"].values())),
        ("estimated peak VRAM", _gib(result["estimated_vram_bytes"])),
        ("samples", "?" if result["samples"] is None else f"{result['samples']:,}"),
        ("optimizer steps", "?" if result["steps_total"] is None else f"{result['steps_total']:,}"),
        ("tokens (guess)", "?" if result["tokens_total_guess"] is None
         else f"{result['tokens_total_guess']:,}"),
    ]:
        head.add_row(label, value)
    console.print(head)
    console.print(_gpu_rich_table(result))
    from .budget import budget_lines

    for line in budget_lines(result["budget"]):
        console.print(line, highlight=False)
    for note in result["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


def _gpu_rich_table(result: dict[str, Any]):
    from rich.table import Table

    gpus = Table(title=f"Per GPU class (sessions of {result['session_limit_s'] / 3600:g} h)")
    for col in ("GPU", "fits", "tokens/s (guess)", "hours (guess)", "sessions (guess)"):
        gpus.add_column(col)
    for name, row in result["gpus"].items():
        gpus.add_row(name, "yes" if row["fits"] else "[red]no[/red]",
                     f"{row['tokens_per_s_guess']:,.0f}",
                     str(row.get("train_hours_guess", "?")), str(row.get("sessions_guess", "?")))
    return gpus


def plan_main(config: RunConfig, *, as_json: bool, tokens_per_s: Optional[float] = None) -> int:
    """Entry point of `agent.py plan`: 0 on success, 2 when the model config cannot be read."""
    try:
        result = plan(config, tokens_per_s=tokens_per_s)
    except PlanError as exc:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {exc}", highlight=False)
        return INVALID
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return OK


# -- a sharded session's per-rank memory (train.sharding fsdp, training/sharding.py) ----------
#
#     per rank = (base weights / N  +  gathered groups  +  LoRA and optimizer (replicated)
#                 + activations + logits) * 1.10 + 0.75 GiB CUDA context
#
# The gathered groups: the root's (the 16-bit lm_head, gathered for the whole forward and
# backward: the fused loss reads its weight) plus the larger of the untied input embedding
# (gathered for its lookup) and two decoder layers (the one computing and the one FSDP2
# prefetches). The activations and
# logits are estimate_vram's (per micro-batch, the same on every rank).

SHARDED_ROWS = {"2×T4 sharded": ("T4-16GB", 2)}  # the fits table's sharded rows: GPU, count


def gathered_group_bytes(cfg, params: dict[str, int], config: RunConfig) -> int:
    """What FSDP2 holds gathered at once: the root's lm_head and the larger of the untied
    input embedding and two decoder layers."""
    H, L, V = _hidden(cfg), cfg.num_hidden_layers, cfg.vocab_size
    per_weight = NF4_BYTES_PER_PARAM if config.model.load_in_4bit else HALF
    layer = params["quantized"] / max(L, 1) * per_weight
    head = V * H * HALF
    embedding = 0 if getattr(cfg, "tie_word_embeddings", False) else head
    return int(head + max(embedding, 2 * layer))


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


def _with_sharded(table: dict, cfg, params: dict[str, int], config: RunConfig) -> dict:
    """The table plus its FSDP rows ("2×T4 sharded": the per-rank estimate)."""
    return {**table, **sharded_rows(cfg, params, config, table)}
