"""Benchmark one QLoRA training setup: HF's standard recipe against the same plus Baton's kernels.

    python scripts/bench.py --preset llama-3.1-8b|mistral-7b|qwen2.5-1.5b|tiny --impl hf|baton|both
                            [--seq-len N] [--steps N] [--batch-size N] [--memory-cap-gb 15]
                            [--precision auto|fp32|fp16|bf16] [--device cuda|cpu] [--json OUT]
    python scripts/bench.py --kernel nf4 --preset NAME [--precision ...] [--json OUT]

Both implementations get the same random-initialised model built from the architecture's real
config (no weights are downloaded), the same random tokens from a seeded generator, the same
seed and settings:
- `hf`: transformers + PEFT LoRA (all linear layers) over bitsandbytes NF4 (double quantized),
  SDPA attention, non-reentrant gradient checkpointing, `prepare_model_for_kbit_training`;
- `baton`: the same, then `kernels.patch.patch_model` (Triton RMSNorm, RoPE, SwiGLU, chunked
  fused linear cross-entropy, and the fused LoRA projections of kernels/lora.py).

A 7B model is built on the meta device and materialised one linear layer at a time, each
quantized to NF4 as soon as it exists, so neither host RAM nor GPU memory ever holds the
whole bf16 model. `--kernel nf4` times Baton's NF4 dequantization kernel against
bitsandbytes' `dequantize_4bit` on the preset's largest projection.

Precision follows the agent's policy (`training.devices.precision_for`): bf16 autocast on
compute capability 8.0 and newer, fp16 autocast with a loss scaler on 6.x and 7.x (T4, P100),
fp32 on the CPU; `--precision` forces one. (`torch.cuda.is_bf16_supported()` is True on a
T4 by emulation, where the agent trains in fp16: a bench that asked it would not measure
what a T4 session runs.) The NF4 kernel bench dequantizes to that dtype too. On a GPU below
sm_75, `--kernel nf4` exits 2: Triton does not run there.

Exit codes: 0 done; 2 invalid input (a kernel path this device cannot run).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

console = Console(stderr=True)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The published configs of meta-llama/Llama-3.1-8B, mistralai/Mistral-7B-v0.3, Qwen/Qwen2.5-1.5B.
PRESETS: dict[str, tuple[str, dict]] = {
    "llama-3.1-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=None, tie_word_embeddings=False)),
    "qwen2.5-1.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, tie_word_embeddings=True)),
    "tiny": ("llama", dict(
        vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
INIT_STD = 0.02


# --- model ------------------------------------------------------------------------------


def preset_config(name: str):
    from transformers import AutoConfig

    model_type, kwargs = PRESETS[name]
    return AutoConfig.for_model(model_type, **kwargs)


def _random(shape, device, dtype, gen) -> torch.Tensor:
    values = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return (values * INIT_STD).to(dtype)


def _quantize_linears(model, compute_dtype) -> None:
    """Swap every nn.Linear but lm_head for an empty bnb Linear4bit (still on meta)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)


def _materialise_param(module, name, param, device, dtype, gen):
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
        data = _random(tuple(param.shape), device, dtype, gen)
        new = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=True,
                                quant_type="nf4", module=module)
        return new.to(device)  # quantizes now: the bf16 copy is freed with `data`
    if name == "bias":
        data = torch.zeros(param.shape, device=device, dtype=dtype)
    elif "norm" in type(module).__name__.lower():
        data = torch.ones(param.shape, device=device, dtype=dtype)
    else:
        data = _random(tuple(param.shape), device, dtype, gen)
    return torch.nn.Parameter(data, requires_grad=False)


def _materialise(model, device, dtype, seed: int) -> None:
    # One parameter at a time, in module order, from one seeded generator: the same model
    # for both implementations. Tied parameters stay tied (memo by identity).
    gen = torch.Generator(device=device).manual_seed(seed)
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = _materialise_param(module, name, param, device, dtype, gen)
            module._parameters[name] = done[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int):
    """NF4-quantized random model of the preset, LoRA on all linear layers, ready to train."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    config = preset_config(preset)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # init_empty_weights skips tying (Qwen2.5 shares embeddings and lm_head)
    _quantize_linears(model, dtype)
    _materialise(model, device, dtype, seed)
    model.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT reads it
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # the same LoRA init for both implementations
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model


# --- training loop ----------------------------------------------------------------------


def _batches(vocab: int, steps: int, batch: int, seq: int, seed: int, device):
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        yield torch.randint(0, vocab, (batch, seq), generator=gen).to(device)


PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def resolve_precision(requested: str, capability: tuple[int, int] | None) -> str:
    """`--precision`: "auto" is the agent's own choice for the device, else as asked."""
    from training.devices import precision_for

    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    return precision_for(capability) if requested == "auto" else requested


def _autocast_dtype(args) -> torch.dtype | None:
    """The autocast dtype of args.precision (resolved), None for fp32 (no autocast)."""
    return None if args.precision == "fp32" else _DTYPES[args.precision]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, args, device, progress, task) -> tuple[list[float], list[float]]:
    amp = _autocast_dtype(args)
    # fp16 trains with a dynamic loss scaler, as the agent does (on the CPU too).
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    losses, seconds = [], []
    vocab = model.config.vocab_size
    for ids in _batches(vocab, args.steps, args.batch_size, args.seq_len, args.seed, device):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        progress.advance(task)
    return losses, seconds


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _throughput(seconds: list[float], tokens_per_step: int) -> dict:
    timed = seconds[1:] or seconds  # the first step pays for compilation and autotuning
    return {
        "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
        "tokens_per_s_incl_first": tokens_per_step * len(seconds) / sum(seconds),
        "step_seconds": seconds,
    }


def _weights_dtype(args) -> torch.dtype:
    amp = _autocast_dtype(args)
    return amp if amp is not None else torch.float32


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_memory_bytes": peak, "peak_memory_gb": round(peak / 2**30, 3),
            "resident_bytes": torch.cuda.memory_allocated(device)}


def run_impl(impl: str, args, device: torch.device, progress) -> dict:
    """Build, (patch,) train; the peak memory is that of training, weights included."""
    from kernels.patch import patch_model

    _release(device)
    task = progress.add_task(f"{impl}: build", total=args.steps)
    result: dict = {"impl": impl}
    try:
        model = build_model(args.preset, device, _weights_dtype(args), args.seed)
        if impl == "baton":
            report = patch_model(model, device)
            result.update(kernels=report.path, patched=report.patched)
        _release(device)  # the build's transient buffers are not the training's peak
        progress.update(task, description=f"{impl}: train")
        losses, seconds = _train(model, args, device, progress, task)
        result.update(losses=losses, **_throughput(seconds, args.batch_size * args.seq_len))
    except torch.cuda.OutOfMemoryError as exc:
        result.update(oom=True, error=str(exc).splitlines()[0])
    result.update(_memory(device))
    model = None  # noqa: F841  free before the next implementation is built
    _release(device)
    return result


# --- NF4 micro-benchmark ----------------------------------------------------------------


def _time(stmt, globals_: dict, min_run_time: float) -> float:
    from torch.utils.benchmark import Timer

    return Timer(stmt=stmt, globals=globals_).blocked_autorange(min_run_time=min_run_time).median


def check_kernel_device(capability: tuple[int, int] | None) -> None:
    """`--kernel` times a Triton kernel: refuse a CUDA GPU below sm_75 (KernelChoiceError)."""
    from kernels.dispatch import check_triton_capability

    check_triton_capability(capability)


def bench_nf4(args, device: torch.device) -> dict:
    """Time Baton's NF4 dequantization against bitsandbytes on the preset's largest projection."""
    check_kernel_device(device_capability(device))
    import bitsandbytes.functional as bnbf

    from kernels.dispatch import launchable, triton_available

    config = preset_config(args.preset)
    shape = (config.intermediate_size, config.hidden_size)
    dtype = _weights_dtype(args)  # the dtype a session of this precision dequantizes to
    w = torch.randn(shape, device=device, dtype=dtype) * INIT_STD
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    result: dict = {"kernel": "nf4", "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch.")}
    g = {"bnbf": bnbf, "packed": packed, "state": state}
    result["bitsandbytes_s"] = _time("bnbf.dequantize_4bit(packed, state)", g, args.min_run_time)
    # Triton is an optional third-party package (the reference path runs without it); without
    # it there is no Baton kernel to time. kernels.nf4 itself is ours: imported unguarded.
    if not triton_available():
        return {**result, "baton_s": None, "note": "triton is not installed"}
    if not launchable(packed):
        return {**result, "baton_s": None, "note": "Triton needs CUDA or TRITON_INTERPRET=1"}
    from kernels.nf4 import dequantize_nf4

    g["dequantize_nf4"] = dequantize_nf4
    result["baton_s"] = _time("dequantize_nf4(packed, state, dtype)", {**g, "dtype": dtype},
                              args.min_run_time)
    want = bnbf.dequantize_4bit(packed, state)
    result["max_abs_diff"] = float((dequantize_nf4(packed, state, dtype) - want).abs().max())
    result["speedup"] = result["bitsandbytes_s"] / result["baton_s"]
    return result


# --- command line -----------------------------------------------------------------------


def _environment(device: torch.device) -> dict:
    import transformers

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(),
           "host_cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    return env


def max_loss_diff(runs: dict) -> float | None:
    a, b = (runs.get(k, {}).get("losses") for k in ("hf", "baton"))
    if not a or not b:
        return None
    return max(abs(x - y) for x, y in zip(a, b))


def _apply_memory_cap(cap_gb: float | None, device: torch.device) -> None:
    if cap_gb is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)


def _print_table(runs: dict) -> None:
    table = Table(title="bench")
    for col in ("impl", "kernels", "tokens/s", "peak GiB", "first loss", "last loss"):
        table.add_column(col)
    for impl, r in runs.items():
        losses = r.get("losses") or [math.nan]
        table.add_row(impl, r.get("kernels", "-"), f"{r.get('tokens_per_s', math.nan):.1f}",
                      str(r.get("peak_memory_gb", "-")), f"{losses[0]:.4f}", f"{losses[-1]:.4f}")
    console.print(table)


def run_training(args, device: torch.device) -> dict:
    impls = ["hf", "baton"] if args.impl == "both" else [args.impl]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        runs = {impl: run_impl(impl, args, device, progress) for impl in impls}
    _print_table(runs)
    out = {"runs": runs, "max_loss_diff": max_loss_diff(runs)}
    if device.type == "cpu":
        out["cpu_max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--impl", choices=["hf", "baton", "both"], default="both")
    p.add_argument("--kernel", choices=["nf4"], help="time one kernel instead of training")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--memory-cap-gb", type=float, default=None,
                   help="cap this process's GPU memory, e.g. 15 for a T4-sized budget")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: the agent's policy (bf16 on sm_80+, fp16 on 6.x/7.x, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per --kernel timing")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1 and --seq-len >= 2")
    return args


def main(argv=None) -> int:
    from kernels.dispatch import KernelChoiceError

    args = parse_args(argv)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device_capability(device))
    _apply_memory_cap(args.memory_cap_gb, device)
    result = {"preset": args.preset, "seq_len": args.seq_len, "steps": args.steps,
              "batch_size": args.batch_size, "seed": args.seed, "memory_cap_gb": args.memory_cap_gb,
              "precision": args.precision, **_environment(device)}
    try:
        if args.kernel:
            result["nf4"] = bench_nf4(args, device)
            console.print(result["nf4"])
        else:
            result.update(run_training(args, device))
    except KernelChoiceError as exc:  # e.g. a Triton path on a GPU below sm_75
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
