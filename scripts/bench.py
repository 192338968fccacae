"""Benchmark QLoRA training: HF's standard recipe against Baton, on a preset or on real data.

    python scripts/bench.py --preset llama-3.1-8b|mistral-7b|qwen2.5-1.5b|tiny --impl hf|baton|both
                            [--seq-len N] [--steps N] [--batch-size N] [--memory-cap-gb 14]
                            [--precision auto|fp32|fp16|bf16] [--device cuda|cpu] [--json OUT]
    python scripts/bench.py --model DIR --data FILE --micro-batch-size 8 --seq-len 512
                            --steps N --impl both [--repeats 3] [--json OUT]
    python scripts/bench.py --kernel nf4|lora_mlp --preset NAME [--precision ...] [--json OUT]

A preset is a published architecture with random NF4 weights and random tokens
(`bench_presets.py`); `--model DIR --data FILE` trains a real model on any file a run accepts,
in the run's own sample order, at the run's micro-batch (`bench_data.py`). Each implementation
(`bench_train.py`): `hf` is what a TRL user runs (transformers + PEFT + bitsandbytes NF4,
gradient checkpointing, SDPA, each micro-batch padded to its longest sample); `baton` is
built and trained as the agent does (the engine's loader, batching, optimizer, kernels). The
JSON holds, per implementation under `runs` and at the top as `hf` and `baton`:
`tokens_per_s` (real tokens only), `token_efficiency`, `matmul_flops_per_token`, peak memory
and `oom`; and `max_loss_diff` between the two. `--repeats R` runs the pair R times in one
process, alternating which goes first (3 pairs by default), and reports the median tokens/s;
on the CPU with torch's threads set to the free cores (`--threads`), the load average before
and after each pair, the median Baton/HF ratio and its spread, and a warning where the load
exceeded the cores (`bench_load.py`). The first step of each run also counts its ATen ops and
the bytes of lm_head its matmuls read (`bench_ops.py`).

Precision follows the agent's policy (`training.devices.precision_for`): bf16 autocast on
compute capability 8.0 and newer, fp16 autocast with a loss scaler on 6.x and 7.x (T4, P100),
fp32 on the CPU; `--precision` forces one. (`torch.cuda.is_bf16_supported()` is True on a
T4 by emulation, where the agent trains in fp16: a bench that asked it would not measure
what a T4 session runs.) On a GPU, memory is capped by default at what a T4 leaves PyTorch.

Exit codes: 0 done; 2 invalid input (a kernel path this device cannot run, a model folder or
data file the bench cannot use).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baton.scripts.bench_load import free_cores, load_average, pair_summary, summary_text  # noqa: E402
from baton.scripts.bench_kernels import bench_lora_mlp, bench_nf4, check_kernel_device  # noqa: E402,F401
from baton.scripts.bench_presets import PRESETS, preset_config  # noqa: E402,F401
from baton.scripts.bench_train import compute_dtype, run_impl  # noqa: E402

console = Console(stderr=True)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# A Kaggle or Colab T4 has 14.74 GiB; the CUDA context takes about 0.4 GiB outside PyTorch's
# allocator. 14 GiB is what a T4 session can give PyTorch, with a margin.
T4_MEMORY_CAP_GB = 14.0
# The figures every implementation reports (bench_train.py), copied to the top-level entries.
FIELDS = ("tokens_per_s", "token_efficiency", "matmul_flops_per_token", "ops_first_step",
          "lm_head_bytes_first_step", "oom")
_PEAK_KEYS = ("peak_memory_bytes", "peak_reserved_bytes", "peak_rss_bytes")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))


def resolve_precision(requested: str, capability: tuple[int, int] | None) -> str:
    """`--precision`: "auto" is the agent's own choice for the device, else as asked."""
    from baton.training.devices import precision_for

    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    return precision_for(capability) if requested == "auto" else requested


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
    if not cap_gb or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), device)


def _peak_text(r: dict) -> str:
    if "peak_memory_gb" in r:
        return f"{r['peak_memory_gb']} GiB"
    return f"{r['peak_rss_mb']} MiB RSS" if "peak_rss_mb" in r else "-"


def _print_table(runs: dict) -> None:
    table = Table(title="bench")
    for col in ("impl", "kernels", "tokens/s", "token eff.", "GFLOP/token", "peak", "last loss"):
        table.add_column(col)
    for impl, r in runs.items():
        losses = r.get("losses") or [math.nan]
        table.add_row(impl, r.get("kernels", "-"), f"{r.get('tokens_per_s', math.nan):.1f}",
                      f"{r.get('token_efficiency', math.nan):.3f}",
                      f"{r.get('matmul_flops_per_token', math.nan) / 1e9:.3f}",
                      _peak_text(r), f"{losses[-1]:.4f}")
    console.print(table)


def _merge_repeats(rounds: list[dict]) -> dict:
    """One entry per implementation: the first round's run, tokens/s the median over rounds."""
    runs = {}
    for impl in rounds[0]:
        first = dict(rounds[0][impl])
        speeds = [r[impl].get("tokens_per_s") for r in rounds if not r[impl].get("oom")]
        if len(rounds) > 1 and speeds:
            first.update(tokens_per_s=statistics.median(speeds), tokens_per_s_runs=speeds)
        runs[impl] = first
    return runs


def _save_partial(args, rounds: list[dict]) -> None:
    """What is measured so far, beside --json: a long CPU bench that is cut keeps it."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")


def run_training(args, device: torch.device) -> dict:
    impls = ["hf", "baton"] if args.impl == "both" else [args.impl]
    impls = sorted(impls, key=lambda impl: impl != args.first)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    rounds, loads = [], []
    with Progress(*columns, console=console) as progress:
        for i in range(args.repeats):
            order = impls if i % 2 == 0 else impls[::-1]  # neither always pays the warm-up
            rounds.append({})
            before = load_average()
            for impl in order:
                rounds[-1][impl] = run_impl(impl, args, device, progress)
                _save_partial(args, rounds)
            loads.append((before, load_average()))
    runs = _merge_repeats(rounds)
    _print_table(runs)
    out = {"runs": runs, "max_loss_diff": max_loss_diff(runs),
           "rounds": [{impl: r.get("tokens_per_s") for impl, r in rnd.items()}
                      for rnd in rounds]}
    if len(impls) == 2:
        out["pairs"] = pair_summary(rounds, loads, torch.get_num_threads())
        console.print(summary_text(out["pairs"]))
    out.update({impl: {k: r.get(k) for k in FIELDS + _PEAK_KEYS if k in r}
                for impl, r in runs.items()})
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--model", type=Path, help="a model folder (with --data instead of --preset)")
    p.add_argument("--data", type=Path, help="a run's training data: JSONL, CSV or Parquet")
    p.add_argument("--impl", choices=["hf", "baton", "both"], default="both")
    p.add_argument("--kernel", choices=["nf4", "lora_mlp"],
                   help="one kernel instead of training: NF4 timing, or the LoRA MLP's saved bytes")
    p.add_argument("--mlp-shape", type=_pair, help="HIDDEN,INTERMEDIATE for --kernel lora_mlp")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens a row (--data: the most)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-layers", type=int, help="a preset with this many decoder layers")
    p.add_argument("--batch-size", "--micro-batch-size", dest="batch_size", type=int, default=1,
                   help="samples a micro-batch (one micro-batch an optimizer step)")
    p.add_argument("--repeats", type=int,
                   help="runs of the pair, alternating which goes first; tokens/s: median "
                        "(default 3 with --impl both, else 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads on the CPU (default 0: the cores the load leaves free)")
    p.add_argument("--first", choices=["hf", "baton"], default="hf",
                   help="which implementation of the pair runs first (in the first round)")
    p.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=True,
                   help="Baton's layout with --data (the agent's default: padding-free)")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--memory-cap-gb", type=float, default=T4_MEMORY_CAP_GB,
                   help=f"cap this process's GPU memory (default {T4_MEMORY_CAP_GB}: a T4's); 0: none")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: the agent's policy (bf16 on sm_80+, fp16 on 6.x/7.x, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per --kernel timing")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.impl == "both" else 1
    if args.steps < 1 or args.seq_len < 2 or args.batch_size < 1 or args.repeats < 1:
        p.error("--steps, --batch-size and --repeats must be >= 1 and --seq-len >= 2")
    if (args.model is None) != (args.data is None):
        p.error("--model and --data go together: a model folder and a run's data file")
    if args.kernel:
        if args.preset is None and not (args.kernel == "lora_mlp" and args.mlp_shape):
            p.error("--kernel needs --preset NAME (or, for lora_mlp, --mlp-shape H,I)")
    elif (args.preset is None) == (args.data is None):
        p.error("give --preset NAME, or --model DIR --data FILE")
    if args.seq_len < 8 and args.data:
        p.error("--seq-len must be >= 8 with --data (a run's data.max_seq_len)")
    return args


def _pair(text: str) -> tuple[int, int]:
    try:
        hidden, inter = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HIDDEN,INTERMEDIATE, e.g. 512,1408")
    return hidden, inter


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _kernel(args, device: torch.device) -> dict:
    dtype = compute_dtype(args.precision)
    if args.kernel == "nf4":
        return bench_nf4(args, device, dtype, device_capability(device))
    return bench_lora_mlp(args, device, dtype)


def main(argv=None) -> int:
    from baton.kernels.dispatch import KernelChoiceError
    from baton.scripts.bench_data import BenchInputError, run_spec

    args = parse_args(argv)
    device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, device_capability(device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads or free_cores())
    _apply_memory_cap(args.memory_cap_gb, device)
    result = {"preset": args.preset, "num_layers": args.num_layers,
              "model": _text(args.model), "data": _text(args.data),
              "seq_len": args.seq_len, "steps": args.steps, "batch_size": args.batch_size,
              "repeats": args.repeats, "seed": args.seed, "precision": args.precision,
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "padding_free": args.padding_free if args.data else None,
              "memory_cap_gb": args.memory_cap_gb if device.type == "cuda" else None,
              **_environment(device)}
    try:
        if args.kernel:
            result[args.kernel] = _kernel(args, device)
            console.print(result[args.kernel])
        else:
            # A model or data file the bench cannot use is refused before anything is built.
            args.spec = run_spec(args.model, args.data, seq_len=args.seq_len,
                                 micro=args.batch_size, steps=args.steps,
                                 seed=args.seed) if args.data else None
            result.update(run_training(args, device))
    except (KernelChoiceError, BenchInputError) as exc:  # e.g. Triton on a GPU below sm_75
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_name(args.json.name + ".partial").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
