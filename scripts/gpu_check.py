#!/usr/bin/env python
"""`make gpu-check`: the first command a machine with a GPU runs, within 8 minutes.

    python scripts/gpu_check.py OUT_DIR [--dry-run] [--budget-s 480] [--wheels .whl]

Parts, in this order, each in its own process with its own time budget (a part is cut at its
budget or at the overall deadline, and one that cannot start in time is skipped, saying so):
1. bitsandbytes (and pytest): imported, or installed offline from the wheel folder (`.whl/`,
   filled beforehand: `pip download bitsandbytes==0.50.2 --no-deps -d .whl` and
   `pip download pytest -d .whl`);
2. kernel tests, natively: `tests/test_kernels_*.py` on the GPU with TRITON_INTERPRET=0
   (through the `tests.native_device` pytest plugin), every op's forward and gradients against
   its plain-PyTorch reference in fp32, fp16 and bf16;
3. the NF4 dequantization bench (`bench.py --kernel nf4`) at the session's precision;
4. an agent handoff on the GPU: session 1 `--precision fp16` is stopped part way (SIGTERM,
   exit 75), session 2 `--precision bf16` resumes from another work folder and finishes; the
   step must continue exactly and every logged learning rate must be the schedule's;
5. `bench.py --impl both` at seq 2048 with `--memory-cap-gb 15` on qwen2.5-1.5b and
   llama-3.1-8b, under fp16 (the T4 policy) and bf16 (bf16 needs sm_80+).
Nothing reaches the network: the models are random weights built from the architectures'
configs. It writes OUT_DIR/gpu_check.json, OUT_DIR/gpu_check.md (one table) and a log a part
under OUT_DIR/logs/. Exit 0 when no part failed (skipped parts are listed, not failures).

`--dry-run` runs the same code on the CPU end to end in about a minute: the tiny preset, the
Triton interpreter for one kernel test file, tiny budgets (the test suite runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
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

BNB_VERSION = "0.50.2"
BENCH = ROOT / "scripts" / "bench.py"
AGENT = ROOT / "agent.py"
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss \S+ lr (\S+)")


@dataclass
class Part:
    name: str
    budget_s: float
    run: Callable[["Check", float], dict]  # (check, seconds allowed) -> details
    skip: Optional[str] = None  # why it does not run on this machine


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timed_out | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    note: str = ""
    details: dict = field(default_factory=dict)


class PartFailed(Exception):
    def __init__(self, note: str, details: Optional[dict] = None):
        super().__init__(note)
        self.details = details or {}


class PartTimedOut(PartFailed):
    pass


@dataclass
class Check:
    out: Path
    dry_run: bool
    wheels: Path
    capability: Optional[tuple[int, int]]

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def command(self, name: str, args: list[str], timeout: float,
                env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Run `args` from the repository root, output to logs/<name>.log; cut at `timeout`."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with log.open("w") as handle:
            handle.write("$ " + " ".join(args) + "\n")
            handle.flush()
            try:
                return subprocess.run(args, cwd=ROOT, env={**os.environ, **(env or {})},
                                      stdout=handle, stderr=subprocess.STDOUT, text=True,
                                      timeout=timeout)
            except subprocess.TimeoutExpired:
                raise PartTimedOut(f"cut at its budget of {timeout:.0f} s; see {log}") from None


# --- the parts ----------------------------------------------------------------------------


def _install_offline(check: Check, requirement: str) -> None:
    args = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
            str(check.wheels), requirement]
    name = requirement.split("=")[0]
    if check.command(f"install_{name}", args, 120).returncode != 0:
        raise PartFailed(f"pip could not install {requirement} from {check.wheels}; see "
                         f"logs/install_{name}.log. On a machine with internet: {FILL_WHEELS}")
    importlib.invalidate_caches()


FILL_WHEELS = (f"pip download bitsandbytes=={BNB_VERSION} --no-deps -d .whl && "
               "pip download pytest -d .whl")


def ensure_bitsandbytes(check: Check, allowed: float) -> dict:
    """bitsandbytes (and pytest, for the kernel tests) importable, from `.whl/` if need be."""
    done = {}
    if importlib.util.find_spec("pytest") is None:
        _install_offline(check, "pytest")
        done["pytest"] = "installed from .whl"
    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes

        return {"bitsandbytes": bitsandbytes.__version__, "installed_now": False, **done}
    wheels = sorted(check.wheels.glob(f"bitsandbytes-{BNB_VERSION}-*.whl"))
    if not wheels:
        raise PartFailed(f"bitsandbytes is not installed and {check.wheels} holds no "
                         f"bitsandbytes-{BNB_VERSION} wheel; on a machine with internet run "
                         f"{FILL_WHEELS}")
    _install_offline(check, f"bitsandbytes=={BNB_VERSION}")
    return {"bitsandbytes": BNB_VERSION, "installed_now": True, "wheel": wheels[0].name, **done}


_SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def kernel_tests(check: Check, allowed: float) -> dict:
    files = (["tests/test_kernels_swiglu.py"] if check.dry_run else
             sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py")
                    if p.name != "test_kernels_no_triton.py"))  # a CPU-only run by design
    env = {"BATON_TEST_DEVICE": "cpu" if check.dry_run else "cuda",
           "TRITON_INTERPRET": "1" if check.dry_run else "0"}
    args = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "tests.native_device",
            "-p", "no:cacheprovider", *files]
    proc = check.command("kernel_tests", args, allowed, env)
    text = (check.logs / "kernel_tests.log").read_text()
    counts = {kind: int(n) for n, kind in _SUMMARY.findall(text.strip().splitlines()[-1])}
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    details = {"files": files, "counts": counts, "failures": failures[:50], **env}
    if proc.returncode != 0:
        raise PartFailed(f"{len(failures)} kernel test(s) failed natively", details)
    return details


def _bench(check: Check, name: str, args: list[str], allowed: float) -> dict:
    out = check.out / f"{name}.json"
    env = {"TRITON_INTERPRET": "1"} if check.dry_run else {"TRITON_INTERPRET": "0"}
    proc = check.command(name, [sys.executable, str(BENCH), *args, "--json", str(out)], allowed,
                         env)
    if proc.returncode != 0 or not out.is_file():
        raise PartFailed(f"bench.py exited {proc.returncode}; see logs/{name}.log")
    return json.loads(out.read_text())


def nf4_bench(check: Check, allowed: float) -> dict:
    preset = "tiny" if check.dry_run else "llama-3.1-8b"
    result = _bench(check, "nf4_bench", ["--kernel", "nf4", "--preset", preset,
                                         "--min-run-time", "0.01" if check.dry_run else "1"],
                    allowed)
    nf4 = result["nf4"]
    if nf4.get("baton_s") is None or nf4.get("max_abs_diff") != 0.0:
        raise PartFailed(f"NF4 kernel not bit-identical or not run: {nf4}", nf4)
    return {"precision": result["precision"], **nf4}


def training_bench(preset: str, precision: str):
    def run(check: Check, allowed: float) -> dict:
        args = ["--preset", preset, "--impl", "both", "--precision", precision]
        args += (["--seq-len", "16", "--steps", "2"] if check.dry_run else
                 ["--seq-len", "2048", "--steps", "4", "--memory-cap-gb", "15"])
        result = _bench(check, f"bench_{preset}_{precision}", args, allowed)
        runs = result["runs"]
        summary = {impl: {k: r.get(k) for k in ("kernels", "tokens_per_s", "peak_memory_gb",
                                                 "oom", "losses")} for impl, r in runs.items()}
        return {"preset": preset, "precision": precision, "max_loss_diff": result["max_loss_diff"],
                "runs": summary}
    return run


def handoff(check: Check, allowed: float) -> dict:
    from scripts.gpu_handoff import HandoffFailed, run_handoff

    deadline = time.monotonic() + allowed
    try:
        return run_handoff(check.out / "handoff", check.logs, deadline, dry_run=check.dry_run)
    except HandoffFailed as exc:
        raise (PartTimedOut if "budget" in str(exc) else PartFailed)(str(exc)) from None


# --- the plan -----------------------------------------------------------------------------


def agent_has_precision_flag() -> bool:
    proc = subprocess.run([sys.executable, str(AGENT), "run", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return "--precision" in proc.stdout


def plan(check: Check) -> list[Part]:
    cap = check.capability
    dry = check.dry_run
    no_triton = (None if dry or (cap and cap >= (7, 5)) else
                 "the GPU is below sm_75: Triton does not run there (the reference path does)")
    no_bf16 = (None if dry or (cap and cap >= (8, 0)) else
               "bf16 needs sm_80 or newer; the agent trains in fp16 on this GPU")
    no_flag = None if agent_has_precision_flag() else (
        "agent.py run has no --precision flag yet: the fp16 -> bf16 handoff cannot be asked for")
    b = (lambda gpu, cpu: cpu if dry else gpu)
    parts = [
        Part("bitsandbytes", b(60, 30), ensure_bitsandbytes),
        Part("kernel_tests", b(120, 90), kernel_tests, no_triton),
        Part("nf4_bench", b(40, 30), nf4_bench, no_triton),
        Part("handoff", b(100, 150), handoff, no_flag),
    ]
    presets = [("tiny", 60)] if dry else [("qwen2.5-1.5b", 60), ("llama-3.1-8b", 100)]
    for preset, budget in presets:
        for precision in ("fp16", "bf16"):
            parts.append(Part(f"bench_{preset}_{precision}", budget,
                              training_bench(preset, precision),
                              no_bf16 if precision == "bf16" else None))
    return parts


MIN_START_S = 15  # a part that would get less than this is skipped, not started


def run_parts(check: Check, parts: list[Part], budget_s: float) -> list[Outcome]:
    deadline = time.monotonic() + budget_s
    outcomes = []
    for part in parts:
        left = deadline - time.monotonic()
        if part.skip:
            outcomes.append(Outcome(part.name, "skipped", budget_s=part.budget_s, note=part.skip))
            continue
        if left < MIN_START_S:
            outcomes.append(Outcome(part.name, "skipped", budget_s=part.budget_s,
                                    note=f"not started: {max(0, left):.0f} s of the overall "
                                         f"{budget_s:.0f} s were left"))
            continue
        allowed = min(part.budget_s, left)
        started = time.monotonic()
        outcome = Outcome(part.name, "ok", budget_s=part.budget_s)
        print(f"== {part.name} (budget {allowed:.0f} s)", flush=True)
        try:
            outcome.details = part.run(check, allowed)
        except PartTimedOut as exc:
            outcome.status, outcome.note, outcome.details = "timed_out", str(exc), exc.details
        except PartFailed as exc:
            outcome.status, outcome.note, outcome.details = "failed", str(exc), exc.details
        except Exception as exc:  # a bug in a part must not lose the others' results
            outcome.status, outcome.note = "failed", f"{type(exc).__name__}: {exc}"
        outcome.seconds = round(time.monotonic() - started, 1)
        print(f"   {outcome.status} in {outcome.seconds} s {outcome.note}", flush=True)
        outcomes.append(outcome)
    return outcomes


# --- environment and report ---------------------------------------------------------------


def environment(dry_run: bool) -> dict:
    import torch

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "python": sys.version.split()[0], "torch": torch.__version__, "dry_run": dry_run}
    for name in ("triton", "transformers", "peft", "bitsandbytes"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:  # absent or broken: recorded, not fatal
            env[name] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            env["driver"] = smi.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = "unknown (nvidia-smi failed)"
    return env


def _cell(outcome: Outcome) -> str:
    d = outcome.details
    if outcome.status != "ok":
        return outcome.note
    if "runs" in d:
        cells = []
        for impl, r in d["runs"].items():
            if r.get("oom"):
                cells.append(f"{impl}: OOM")
            else:
                peak = r.get("peak_memory_gb")
                cells.append(f"{impl} {r.get('kernels') or ''} {r['tokens_per_s']:.0f} tok/s"
                             + (f", {peak} GiB" if peak is not None else ""))
        diff = d.get("max_loss_diff")
        return "; ".join(cells) + (f"; max loss diff {diff:.2e}" if diff is not None else "")
    if "counts" in d:
        return ", ".join(f"{n} {k}" for k, n in d["counts"].items())
    if "speedup" in d:
        return (f"{d['dtype']} {d['shape']}: bitsandbytes {d['bitsandbytes_s'] * 1e6:.1f} µs, "
                f"Baton {d['baton_s'] * 1e6:.1f} µs, x{d['speedup']:.2f}, bit-identical")
    if "sessions" in d:
        return d.get("summary", "")
    return ", ".join(f"{k} {v}" for k, v in d.items())


def write_report(out: Path, env: dict, outcomes: list[Outcome], seconds: float) -> None:
    report = {"environment": env, "seconds": round(seconds, 1),
              "ok": not any(o.status in ("failed", "timed_out") for o in outcomes),
              "parts": [asdict(o) for o in outcomes]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = ("gpu", "capability", "driver", "cuda", "torch", "triton", "transformers", "peft",
            "bitsandbytes", "date")
    lines = ["# Baton GPU check", "",
             ", ".join(f"{k} {env[k]}" for k in keys if k in env)
             + f"{' (dry run on the CPU)' if env['dry_run'] else ''}; {seconds:.0f} s in all.",
             "", "| part | status | seconds | result |", "| --- | --- | --- | --- |"]
    for o in outcomes:
        result = _cell(o).replace("|", "/").replace("\n", " ")
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.0f} / {o.budget_s:.0f} | {result} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and logs/")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU: tiny preset, Triton interpreter, tiny budgets")
    p.add_argument("--budget-s", type=float, default=None,
                   help="overall deadline in seconds (default 480; 240 with --dry-run)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl",
                   help="folder holding the bitsandbytes wheel (default .whl)")
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
    env = environment(args.dry_run)
    print(json.dumps(env), flush=True)
    budget = args.budget_s or (240.0 if args.dry_run else 480.0)
    outcomes = run_parts(check, plan(check), budget - (time.monotonic() - started))
    seconds = time.monotonic() - started
    write_report(check.out, env, outcomes, seconds)
    print((check.out / "gpu_check.md").read_text())
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
