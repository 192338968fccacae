"""One implementation's training run, measured: `run_impl(impl, args, device, progress)`.

Four setups: a preset (random NF4 model, random tokens; `scripts/bench_presets.py`) or a
model folder with a run's data (`--model`/`--data`; `scripts/bench_data.py`), each as `hf`
(transformers + PEFT + bitsandbytes, gradient checkpointing, SDPA, padding per micro-batch:
what a TRL user runs) or `baton` (built and trained as the agent does). Every run reports:

- `tokens_per_s`: real (non-pad) tokens over the seconds of the steps after the first (which
  pays one-off warm-up and, here, the FLOP count);
- `token_efficiency`: real tokens over the tokens the model computed (the `input_ids` of every
  forward, whatever their layout);
- `matmul_flops_per_token`: matmul FLOPs of the first step (`scripts/bench_flops.py`: forward,
  checkpoint recompute and backward) over its real tokens;
- `ops_first_step`, `lm_head_bytes_first_step`: the first step's ATen ops and the bytes of
  lm_head its matmuls read (`scripts/bench_ops.py`);
- peak memory of training, weights resident, build transients excluded: allocated and reserved
  bytes on a GPU, the process's peak RSS on the CPU (its high-water mark, reset after the build);
- `oom`: true when it ran out of memory (the run stops there; the other implementation runs).
"""

from __future__ import annotations

import gc
import re
import resource
import statistics
import time
import types
from pathlib import Path
from typing import Callable

import torch

from baton.scripts.bench_flops import count_flops
from baton.scripts.bench_ops import count_ops, lm_head_shape

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory ----------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")


def _rss_high_water() -> int | None:
    """The process's peak RSS in bytes (VmHWM), None where /proc does not say."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak(device: torch.device) -> bool:
    """Start a new peak; on the CPU False when the high-water mark cannot be reset (then the
    peak RSS reported is the process's since it started)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory(device: torch.device, was_reset: bool) -> dict:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_memory_bytes": peak, "peak_memory_gb": round(peak / 2**30, 3),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
                "resident_bytes": torch.cuda.memory_allocated(device)}
    rss = _rss_high_water()
    if rss is None:  # ru_maxrss is in KiB on Linux
        rss, was_reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    return {"peak_rss_bytes": rss, "peak_rss_mb": round(rss / 2**20, 1),
            "peak_rss_since_build": was_reset}


# --- the measured loop -------------------------------------------------------------------


class TokenMeter:
    """Counts the tokens every forward of `model` computes, from its `input_ids`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.computed = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.computed += ids.numel()

    def close(self) -> None:
        self._handle.remove()


def measure(model, step: Callable[[], tuple[float, int]], steps: int, device, advance) -> dict:
    """Run `step` (-> loss, real tokens) `steps` times; the first one under the FLOP counter."""
    meter = TokenMeter(model)
    losses, seconds, real = [], [], []
    try:
        for i in range(steps):
            _sync(device)
            start = time.perf_counter()
            if i == 0:
                with count_flops() as flops, count_ops(lm_head_shape(model)) as ops:
                    loss, tokens = step()
            else:
                loss, tokens = step()
            _sync(device)
            seconds.append(time.perf_counter() - start)
            losses.append(loss)
            real.append(tokens)
            advance()
    finally:
        meter.close()
    timed = slice(1, None) if steps > 1 else slice(None)
    by_step = [n / t for n, t in zip(real, seconds)]
    return {
        "losses": losses, "step_seconds": seconds, "real_tokens": sum(real),
        "computed_tokens": meter.computed,
        "tokens_per_s": sum(real[timed]) / sum(seconds[timed]),
        # Each step's own rate; the steps hold the same samples for both implementations.
        "tokens_per_s_by_step": by_step,
        "tokens_per_s_median_step": statistics.median(by_step[timed]),
        "tokens_per_s_incl_first": sum(real) / sum(seconds),
        "token_efficiency": sum(real) / max(meter.computed, 1),
        "matmul_flops_first_step": flops.total,
        "matmul_flops_per_token": flops.total / max(real[0], 1),
        # Counts of the first step (forward, recompute, backward, optimizer): ATen ops, and
        # the bytes of every matmul operand shaped like lm_head (its weight read a pass).
        "ops_first_step": ops.total, "lm_head_bytes_first_step": ops.lm_head_bytes,
    }


# --- the four setups ---------------------------------------------------------------------


def _default_train_spec(seed: int):
    """A run's train settings with every default (8-bit AdamW, lr 2e-4, clip 0.3, linear
    schedule), for the presets, which have no run; the optimizer and schedule factories read
    only `spec.train`."""
    from baton.state_schema.config import TrainConfig, TrainSpec

    train = TrainConfig(seed=seed).model_dump(exclude={"micro_batch_size", "precision", "sharding"})
    return types.SimpleNamespace(train=TrainSpec(**train))


class _Loop:
    """The HF side's optimizer step, as TRL's trainer runs it: autocast, scaled backward,
    clipping, the run's optimizer and schedule (the engine's own factories)."""

    def __init__(self, model, spec, device: torch.device, precision: str, total: int):
        from baton.training.optim import make_optimizer, make_scheduler

        self.model, self.device, self.spec = model, device, spec
        self.amp = None if precision == "fp32" else compute_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(spec, self.params, device.type)
        self.sched = make_scheduler(spec, self.opt, total, 0)

    def step(self, batch: dict, real: int, label_tokens: int | None = None) -> tuple[float, int]:
        extra = {} if label_tokens is None else {
            "num_items_in_batch": torch.tensor(max(label_tokens, 1), device=self.device)}
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            loss = self.model(**batch, **extra).loss
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        if self.spec.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.train.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), real


def preset_run(impl: str, args, device: torch.device, result: dict) -> tuple:
    """(model, step) of a preset: random NF4 model and tokens, one batch of seq a step."""
    from baton.kernels.patch import patch_model
    from baton.scripts.bench_data import RandomTokens
    from baton.scripts.bench_presets import build_model

    model = build_model(args.preset, impl, device, compute_dtype(args.precision), args.seed,
                        args.num_layers)
    if impl == "baton":
        report = patch_model(model, device)
        result.update(kernels=report.path, patched=report.patched)
    loop = _Loop(model, _default_train_spec(args.seed), device, args.precision, args.steps)
    batches = RandomTokens(model.config.vocab_size, args.batch_size, args.seq_len,
                           args.seed).batches(args.steps, device)

    def step():
        ids = next(batches)
        return loop.step({"input_ids": ids, "labels": ids}, ids.numel())

    return model, step


def data_run(impl: str, args, device: torch.device, result: dict) -> tuple:
    """(model, step) of `--model`/`--data` (`args.spec`, `bench_data.run_spec`'s): Baton
    through the engine, HF as a TRL user."""
    if impl == "baton":
        return _baton_data_run(args.spec, args, result)
    return _hf_data_run(args.spec, args, device)


def _baton_data_run(spec, args, result: dict) -> tuple:
    from baton.training.engine import Trainer

    trainer = Trainer(spec, data_path=args.data, micro_batch_size=args.batch_size,
                      device=args.device, precision=args.precision,
                      padding_free=args.padding_free)
    result.update(kernels=trainer.device_info.kernels, attention=trainer.attention,
                  padding_free=trainer.padding_free, optimizer=type(trainer.optimizer).__name__)

    def step():
        done = trainer.train_step()
        return done.loss, done.tokens

    return trainer.model, step


def _hf_model(spec, device: torch.device, dtype: torch.dtype):
    """from_pretrained in NF4 (double quantization), SDPA, then PEFT's kbit preparation with
    non-reentrant gradient checkpointing and LoRA: the QLoRA recipe TRL's docs give."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from baton.training.model import PLAIN_MODULES, lora_config

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    # The plain modules (no Hub kernels): the same ops on both sides of the comparison.
    model = AutoModelForCausalLM.from_pretrained(
        spec.model.name, quantization_config=quant, dtype=dtype, attn_implementation="sdpa",
        device_map={"": str(device)}, **PLAIN_MODULES)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(spec.train.seed)
    model = get_peft_model(model, lora_config(spec.lora))
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(spec.model.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _hf_data_run(spec, args, device: torch.device) -> tuple:
    from baton.scripts.bench_data import pad_batch, step_samples
    from baton.training.dataset import RunData

    model, tokenizer = _hf_model(spec, device, compute_dtype(args.precision))
    data = RunData(spec, args.data)
    data.attach(tokenizer)
    loop = _Loop(model, spec, device, args.precision, args.steps)
    order = step_samples(spec, data.n_train, args.steps)

    def step():
        samples = [data.sample(i) for i in next(order)]
        batch = {k: v.to(device) for k, v in pad_batch(samples, tokenizer.pad_token_id).items()}
        real = sum(len(s.input_ids) for s in samples)
        return loop.step(batch, real, sum(s.label_tokens for s in samples))

    return model.train(), step


def _advance(progress, task, impl: str) -> Callable[[], None]:
    """Moves the bar; where the output is not a terminal (a log file), one line a step."""
    def advance() -> None:
        progress.advance(task)
        if not progress.console.is_terminal:
            done = int(progress.tasks[task].completed)
            progress.console.log(f"{impl}: step {done} of {progress.tasks[task].total:g} done")
    return advance


def run_impl(impl: str, args, device: torch.device, progress) -> dict:
    """Build, train, measure one implementation; out of memory is a result, not a crash."""
    task = progress.add_task(f"{impl}: build", total=args.steps)
    result: dict = {"impl": impl, "oom": False}
    model = None
    try:
        build = data_run if args.data else preset_run
        model, step = build(impl, args, device, result)
        was_reset = reset_peak(device)  # the build's transient buffers are not the training's
        progress.update(task, description=f"{impl}: train")
        result.update(measure(model, step, args.steps, device, _advance(progress, task, impl)))
        result.update(peak_memory(device, was_reset))
    except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError is this class
        result.update(oom=True, error=str(exc).splitlines()[0], **peak_memory(device, True))
    model = step = None  # noqa: F841  free before the next implementation is built
    reset_peak(device)
    return result
