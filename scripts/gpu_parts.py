"""The parts of the GPU check (scripts/gpu_check.py orders them, gives each its budget and
writes the report). A part is a function (check, seconds allowed) -> details that raises
PartFailed with a note when its verdict is "fail"; each runs its work in processes of its own,
so that an abort (a Triton LLVM abort, an OOM kill) ends that process, not the check.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench.py"
AGENT = ROOT / "agent.py"
# Largest per-step loss difference between HF and Baton allowed in the training bench, on a
# loss of about ln(128256) + 0.8 = 12.6 (random weights, random tokens): the two paths round
# differently (bf16 keeps 8 bits, a relative 2^-9 = 0.2% a value; fp16 11 bits), which moves
# a mean over 2048 tokens by far less than 0.1% within 4 steps; a wrong forward or gradient
# moves it by more, or makes it non-finite. The tiny CPU preset measures 2e-5 to 1e-4.
LOSS_TOL = {"fp32": 1e-3, "fp16": 0.02, "bf16": 0.05}
DRY_KERNEL_FILES = ("tests/test_kernels_guard.py",)  # the CPU suite runs them all anyway


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

    @property
    def bf16(self) -> bool:
        """bf16 runs here: the CPU (dry run) and sm_80 or newer."""
        return self.dry_run or (self.capability is not None and self.capability >= (8, 0))

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
                                      timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                raise PartTimedOut(f"cut at its budget of {timeout:.0f} s; see logs/{name}.log")


def triton_env(check: Check) -> dict:
    return {"TRITON_INTERPRET": "1" if check.dry_run else "0"}


# --- 0. what the image lacks, from the wheel folder ----------------------------------------


def wheels(check: Check, allowed: float) -> dict:
    from baton.scripts.gpu_wheels import WheelsError, install_missing

    check.logs.mkdir(parents=True, exist_ok=True)
    try:
        done = install_missing(check.wheels, check.out / "site", check.logs / "wheels.log")
    except WheelsError as exc:
        raise PartFailed(str(exc)) from None
    if done["unsatisfied"]:
        raise PartFailed("installed, but requirements are unmet: "
                         + "; ".join(done["unsatisfied"]), done)
    agent = check.command("agent_help", [sys.executable, str(AGENT), "run", "--help"],
                          min(allowed, 60))
    if agent.returncode != 0:
        raise PartFailed(f"agent.py run --help exited {agent.returncode}: it cannot import "
                         "here; see logs/agent_help.log", done)
    return done


# --- 1. the kernel tests, natively, a file a process --------------------------------------


def kernel_test_files(dry_run: bool) -> list[str]:
    if dry_run:
        return list(DRY_KERNEL_FILES)
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py"))


def run_test_file(check: Check, path: str, allowed: float) -> dict:
    """pytest on one file in its own process; its counts from its JUnit XML. A signal, a
    missing report or no test collected is a failure, named."""
    stem = Path(path).stem
    junit = check.out / "junit" / f"{stem}.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    junit.unlink(missing_ok=True)
    env = {"BATON_TEST_DEVICE": "cpu" if check.dry_run else "cuda", **triton_env(check)}
    args = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "tests.native_device",
            "-p", "no:cacheprovider", f"--junitxml={junit}", path]
    proc = check.command(f"kernel_{stem}", args, allowed, env)
    result = {"file": path, "exit": proc.returncode, "passed": 0, "failed": 0, "skipped": 0,
              "failures": []}
    if proc.returncode < 0:
        result["crash"] = f"killed by {signal.Signals(-proc.returncode).name}"
    if junit.is_file():
        result.update(_junit_counts(junit))
    elif "crash" not in result:
        result["crash"] = f"exit code {proc.returncode} and no test report"
    if proc.returncode == 5:
        result["crash"] = "no test collected"
    if proc.returncode not in (0, 5) and not result["failed"] and "crash" not in result:
        result["crash"] = f"exit code {proc.returncode} with no failed test reported"
    return result


def _junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped,
            "failures": failures[:20]}


def kernel_tests(check: Check, allowed: float, files: Optional[list[str]] = None) -> dict:
    deadline = time.monotonic() + allowed
    results = []
    for path in files or kernel_test_files(check.dry_run):
        left = deadline - time.monotonic()
        if left < 5:
            results.append({"file": path, "crash": "not started: the part's budget was spent"})
            continue
        try:
            results.append(run_test_file(check, path, left))
        except PartTimedOut as exc:
            results.append({"file": path, "crash": str(exc)})
    counts = {k: sum(r.get(k, 0) for r in results) for k in ("passed", "failed", "skipped")}
    bad = [r for r in results if r.get("failed") or r.get("crash")]
    details = {"counts": counts, "files": results, **triton_env(check)}
    if bad:
        names = [f"{Path(r['file']).name} ({r.get('crash') or str(r['failed']) + ' failed'})"
                 for r in bad]
        raise PartFailed("kernel tests failed natively: " + ", ".join(names), details)
    return details


# --- 2, 3. bench.py: the 8B-shaped training bench, the NF4 kernel -------------------------


def _bench(check: Check, name: str, args: list[str], allowed: float) -> dict:
    out = check.out / f"{name}.json"
    out.unlink(missing_ok=True)
    proc = check.command(name, [sys.executable, str(BENCH), *args, "--json", str(out)], allowed,
                         triton_env(check))
    if proc.returncode != 0 or not out.is_file():
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exited {proc.returncode}")
        raise PartFailed(f"bench.py {how}; see logs/{name}.log")
    return json.loads(out.read_text())


def judge_training(result: dict, precision: str) -> dict:
    """Pass: Baton ran without OOM, finite losses, within LOSS_TOL of HF at every step."""
    runs = result.get("runs", {})
    summary = {impl: {k: r.get(k) for k in ("kernels", "tokens_per_s", "oom", "losses")
                      if k in r} | {k: v for k, v in r.items() if k.startswith("peak")}
               for impl, r in runs.items()}
    details = {"precision": precision, "max_loss_diff": result.get("max_loss_diff"),
               "tolerance": LOSS_TOL[precision], "runs": summary}
    baton, hf = runs.get("baton", {}), runs.get("hf", {})
    if baton.get("oom") or not baton.get("losses"):
        raise PartFailed(f"Baton {'ran out of memory' if baton.get('oom') else 'has no losses'}: "
                         f"{baton.get('error', '')}", details)
    if not all(math.isfinite(x) for x in baton["losses"]):
        raise PartFailed(f"Baton's losses are not finite: {baton['losses']}", details)
    if hf.get("oom"):
        details["note"] = "hf ran out of memory where Baton fits: losses not compared"
        return details
    diff = result.get("max_loss_diff")
    if diff is None or not diff <= LOSS_TOL[precision]:
        raise PartFailed(f"max loss difference {diff} against HF is over {LOSS_TOL[precision]}",
                         details)
    return details


def training_bench(preset: str, precision: str):
    def run(check: Check, allowed: float) -> dict:
        args = ["--preset", preset, "--impl", "both", "--precision", precision]
        args += (["--seq-len", "16", "--steps", "2"] if check.dry_run else
                 ["--seq-len", "2048", "--steps", "4"])
        result = _bench(check, f"bench_{preset}_{precision}", args, allowed)
        return {"preset": preset, **judge_training(result, precision)}
    return run


def nf4_bench(preset: str, precision: str):
    def run(check: Check, allowed: float) -> dict:
        result = _bench(check, f"nf4_{precision}", [
            "--kernel", "nf4", "--preset", preset, "--precision", precision,
            "--min-run-time", "0.01" if check.dry_run else "1"], allowed)
        nf4 = result["nf4"]
        if nf4.get("baton_s") is None or nf4.get("max_abs_diff") != 0.0:
            raise PartFailed(f"NF4 kernel not bit-identical to bitsandbytes or not run: {nf4}",
                             nf4)
        return {"precision": result.get("precision", precision), **nf4}
    return run


# --- 4, 5, 6. the agent: a handoff, two ranks on one GPU, the reference path --------------


def _agent_part(fn, **kwargs):
    from baton.scripts.gpu_handoff import HandoffFailed

    try:
        return fn(**kwargs)
    except HandoffFailed as exc:
        raise (PartTimedOut if "budget" in str(exc) else PartFailed)(str(exc)) from None


def handoff(check: Check, allowed: float) -> dict:
    from baton.scripts.gpu_handoff import run_handoff

    return _agent_part(run_handoff, work=check.out / "handoff", logs=check.logs,
                       deadline=time.monotonic() + allowed, dry_run=check.dry_run,
                       second="bf16" if check.bf16 else "fp32")


def _kernel_path(check: Check) -> str:
    """What the agent picks here: Triton on sm_75 and newer, the reference elsewhere."""
    gpu_triton = not check.dry_run and check.capability is not None and check.capability >= (7, 5)
    return "triton" if gpu_triton else "reference"


def two_ranks(check: Check, allowed: float) -> dict:
    from baton.scripts.gpu_handoff import run_single

    return _agent_part(run_single, work=check.out / "ranks", logs=check.logs,
                       deadline=time.monotonic() + allowed, name="ranks",
                       env={"BATON_WORLD_SIZE": "2"}, precision="auto",
                       kernels=_kernel_path(check), expect_in_output="x2 ranks",
                       dry_run=check.dry_run)


def sharded(check: Check, allowed: float) -> dict:
    from baton.scripts.gpu_handoff import run_sharded

    return _agent_part(run_sharded, work=check.out / "sharded", logs=check.logs,
                       deadline=time.monotonic() + allowed, dry_run=check.dry_run)


def reference_path(check: Check, allowed: float) -> dict:
    from baton.scripts.gpu_handoff import run_single

    return _agent_part(run_single, work=check.out / "reference", logs=check.logs,
                       deadline=time.monotonic() + allowed, name="reference",
                       env={"BATON_KERNELS": "reference"}, precision="fp16",
                       kernels="reference", dry_run=check.dry_run)
