#!/usr/bin/env python
"""`make gpu-check`: the first command a machine with a GPU runs, within 8 minutes, offline.

    python scripts/gpu_check.py OUT_DIR [--dry-run] [--budget-s 535] [--wheels .whl]

The parts, in order of value, each with its budget (they add up to the 535 s deadline, which
leaves a 10-minute command a minute for the machine's start and the copies; a part is cut
at its budget or at the deadline, and one that cannot start in time is not run, saying so):

| part | what | budget (s) |
| --- | --- | --- |
| wheels | what the image lacks (bitsandbytes, pydantic, tenacity...), offline from `.whl/` | 30 |
| kernel_tests | every `tests/test_kernels_*.py` natively, a process a file | 130 |
| bench_llama-3.1-8b_fp16, _bf16 | `bench.py --impl both`, 8B shapes, seq 2048, 4 steps | 70 + 70 |
| nf4_fp16, nf4_bf16 | `bench.py --kernel nf4`: Baton's NF4 dequantization against bitsandbytes | 15 + 15 |
| handoff | agent fp16 stopped part way, resumed in bf16 (fp32 below sm_80), 8-bit AdamW | 70 |
| ranks | agent with two ranks on one GPU through the elastic launcher (gloo) | 45 |
| sharded | agent, two ranks on one GPU with the NF4 base sharded (FSDP2), against one rank | 55 |
| reference | agent with `BATON_KERNELS=reference`, the path a P100 takes | 35 |

bf16 parts are not run below sm_80, nor any Triton part below sm_75. The verdicts (pass,
fail, not run with the reason) and every figure, with GPU, driver, CUDA, torch and triton, go
to OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; a log a process under OUT_DIR/logs/.
Exit 0 when no part failed. `--dry-run` runs every part on the CPU, tiny (the tiny preset,
Triton's interpreter for one kernel test file, loose budgets): the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baton.scripts import gpu_parts as parts  # noqa: E402
from baton.scripts.gpu_parts import Check, PartFailed, PartTimedOut  # noqa: E402,F401

DEADLINE_S, DRY_DEADLINE_S = 535.0, 2700.0
MIN_START_S = 15  # a part that would get less than this is not run
PASS, FAIL, NOT_RUN = "pass", "fail", "not run"


@dataclass
class Part:
    name: str
    budget_s: float
    run: Callable[[Check, float], dict]  # (check, seconds allowed) -> details
    skip: Optional[str] = None  # why it does not run on this machine


@dataclass
class Outcome:
    name: str
    verdict: str  # pass | fail | not run
    seconds: float = 0.0
    budget_s: float = 0.0
    note: str = ""
    details: dict = field(default_factory=dict)


def plan(check: Check) -> list[Part]:
    cap, dry = check.capability, check.dry_run
    no_triton = (None if dry or (cap and cap >= (7, 5)) else
                 "the GPU is below sm_75: Triton does not run there (the reference path does)")
    no_bf16 = None if check.bf16 else "bf16 needs sm_80 or newer; a session here trains in fp16"
    preset = "tiny" if dry else "llama-3.1-8b"
    # The dry run's budgets are loose on purpose: a shared CI machine is slow and they time
    # nothing; the GPU's add up to DEADLINE_S.
    b = (lambda gpu, cpu: cpu if dry else gpu)
    return [
        Part("wheels", b(30, 240), parts.wheels),
        Part("kernel_tests", b(130, 240), parts.kernel_tests, no_triton),
        Part(f"bench_{preset}_fp16", b(70, 240), parts.training_bench(preset, "fp16")),
        Part(f"bench_{preset}_bf16", b(70, 240), parts.training_bench(preset, "bf16"), no_bf16),
        Part("nf4_fp16", b(15, 180), parts.nf4_bench(preset, "fp16"), no_triton),
        Part("nf4_bf16", b(15, 180), parts.nf4_bench(preset, "bf16"), no_triton or no_bf16),
        Part("handoff", b(70, 480), parts.handoff),
        Part("ranks", b(45, 360), parts.two_ranks),
        Part("sharded", b(55, 480), parts.sharded),
        Part("reference", b(35, 240), parts.reference_path),
    ]


def _run_one(check: Check, part: Part, allowed: float) -> Outcome:
    outcome = Outcome(part.name, PASS, budget_s=part.budget_s)
    started = time.monotonic()
    print(f"== {part.name} (budget {allowed:.0f} s)", flush=True)
    try:
        outcome.details = part.run(check, allowed)
    except PartFailed as exc:  # PartTimedOut too: cut at its budget is a failure
        outcome.verdict, outcome.note, outcome.details = FAIL, str(exc), exc.details
    except Exception as exc:  # noqa: BLE001 - a bug in one part must not lose the others
        outcome.verdict, outcome.note = FAIL, f"{type(exc).__name__}: {exc}"
    outcome.seconds = round(time.monotonic() - started, 1)
    print(f"   {outcome.verdict} in {outcome.seconds} s {outcome.note}", flush=True)
    return outcome


def run_parts(check: Check, todo: list[Part], budget_s: float) -> list[Outcome]:
    deadline = time.monotonic() + budget_s
    outcomes = []
    for part in todo:
        left = deadline - time.monotonic()
        if part.skip:
            outcomes.append(Outcome(part.name, NOT_RUN, budget_s=part.budget_s, note=part.skip))
        elif left < MIN_START_S:
            outcomes.append(Outcome(part.name, NOT_RUN, budget_s=part.budget_s,
                                    note=f"not started: {max(0, left):.0f} s of the overall "
                                         f"{budget_s:.0f} s were left"))
        else:
            outcomes.append(_run_one(check, part, min(part.budget_s, left)))
    return outcomes


# --- environment and report ---------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "torch": torch.__version__, "dry_run": dry_run}
    for name in ("triton", "transformers", "peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - absent or broken: recorded, not fatal
            env[name] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["driver"] = _driver()
    return env


def _driver() -> str:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return smi.stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"


def _cell(outcome: Outcome) -> str:
    d = outcome.details
    text = outcome.note
    if "runs" in d:
        cells = []
        for impl, r in d["runs"].items():
            peak = next((v for k, v in r.items() if k.endswith("_gb")), None)
            cells.append(f"{impl}: OOM" if r.get("oom") else
                         f"{impl} {r.get('kernels') or ''} {r.get('tokens_per_s') or 0:.0f} tok/s"
                         + (f", {peak} GiB" if peak is not None else ""))
        diff = d.get("max_loss_diff")
        text = "; ".join(cells + ([f"max loss diff {diff:.2e} (tol {d['tolerance']})"]
                                  if diff is not None else []) + [d.get("note", ""), text])
    elif "counts" in d:
        text = ", ".join(f"{n} {k}" for k, n in d["counts"].items()) + ("; " + text if text else "")
    elif "speedup" in d:
        text = (f"{d['dtype']} {d['shape']}: bitsandbytes {d['bitsandbytes_s'] * 1e6:.1f} µs, "
                f"Baton {d['baton_s'] * 1e6:.1f} µs, x{d['speedup']:.2f}, bit-identical")
    elif "summary" in d:
        text = d["summary"]
    elif "installed" in d:
        text = f"installed {', '.join(d['installed']) or 'nothing (all present)'}"
    return text.strip("; ")


def write_report(out: Path, env: dict, outcomes: list[Outcome], seconds: float) -> None:
    report = {"environment": env, "seconds": round(seconds, 1),
              "ok": not any(o.verdict == FAIL for o in outcomes),
              "parts": [asdict(o) for o in outcomes]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ("gpu", "capability", "driver", "cuda", "torch", "triton", "transformers", "peft",
            "bitsandbytes", "python", "date")
    lines = ["# Baton GPU check", "",
             ", ".join(f"{k} {env[k]}" for k in keys if k in env)
             + f"{' (dry run on the CPU)' if env.get('dry_run') else ''}; {seconds:.0f} s in all.",
             "", "| part | verdict | seconds | result |", "| --- | --- | --- | --- |"]
    for o in outcomes:
        result = _cell(o).replace("|", "/").replace("\n", " ")
        lines.append(f"| {o.name} | {o.verdict} | {o.seconds:.0f} / {o.budget_s:.0f} | {result} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU: tiny preset, Triton interpreter, tiny budgets")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"overall deadline in seconds (default {DEADLINE_S:.0f}; "
                        f"{DRY_DEADLINE_S:.0f} with --dry-run)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                   help="folder of the wheels the image lacks (make gpu-wheels; default .whl)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: torch sees no CUDA GPU here; use --dry-run to check the script on the CPU",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    capability = None if args.dry_run else tuple(torch.cuda.get_device_capability(0))
    check = Check(args.out.resolve(), args.dry_run, args.wheels.resolve(), capability)
    budget = args.budget_s or (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    outcomes = run_parts(check, plan(check), budget - (time.monotonic() - started))
    env = environment(args.dry_run)  # after the wheels part: bitsandbytes' version too
    seconds = time.monotonic() - started
    write_report(check.out, env, outcomes, seconds)
    print(json.dumps(env), flush=True)
    print((check.out / "gpu_check.md").read_text())
    return 0 if all(o.verdict != FAIL for o in outcomes) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
