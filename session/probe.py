"""The start-up probe: run every Triton kernel once in a child process before training.

A Triton compile error or an LLVM abort at the first fused call would otherwise kill the
agent mid-session (an abort takes the process with it: no `except` runs). So before the model
loads, rank 0 runs `python -m baton.kernels.probe` on the run's shapes and dtype. When the child
fails (an exception, a signal, a timeout, a result unlike the reference), this session trains
on the plain-PyTorch reference path instead, and says so: on the console, in the session
record's `kernels_probe` and in `status` ("kernels: reference (probe: lora_mlp killed by
SIGABRT)"). Where no Triton kernel would run (the reference path, BATON_KERNELS=none) the
probe is skipped and the record says that too.

The child's command comes from `probe_command()`; tests replace it (tests/faults.py) to make
the child fail. The product reads no test setting.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


log = logging.getLogger("baton.session")

ROOT = Path(__file__).resolve().parent.parent  # `-m baton.kernels.probe` must find our `kernels`
PROBE_TIMEOUT_S = 600.0  # a cold Triton cache compiles ~10 kernels: a minute or two on a T4
PROBE_TOKENS = 16  # rows when the session's micro-batch is not known (a test, a tool)


@dataclass
class ProbeOutcome:
    path: str  # the kernel path to train on: "triton" | "reference" | "none"
    note: str  # what the record and status say, e.g. "passed 7 ops in 41.2 s"

    @property
    def failed(self) -> bool:
        return self.note.startswith("failed")


def probe_command() -> list[str]:
    return [sys.executable, "-m", "baton.kernels.probe"]


def job_for(spec, device, model_config, tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """The probe's job: the model's sizes (from its config), the LoRA rank, the dtype, the
    family's op variants, and `tokens` rows: the session's first micro-batch (micro_batch_size
    x max_seq_len at most, what a padding-free row or a padded batch hands the kernels), so that
    the tiles, warps and row-count specialisations the probe compiles are the first step's own."""
    from .family_plan import probe_variants, text_config

    c = text_config(model_config)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"device": device.device, "precision": device.precision, "hidden": c.hidden_size,
            "intermediate": c.intermediate_size, "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads, "head_dim": head_dim,
            "vocab": c.vocab_size, "rank": spec.lora.r, "nf4": bool(spec.model.load_in_4bit),
            "eps": float(getattr(c, "rms_norm_eps", 1e-6)), "tokens": int(tokens),
            **probe_variants(c, head_dim)}


def _events(stdout: str) -> list[dict]:
    events = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue  # a library's own print
        if isinstance(event, dict):
            events.append(event)
    return events


def _reason(code: int, events: list[dict]) -> str:
    """'lora_mlp killed by SIGABRT', 'rope: CompilationError: ...'"""
    started = [e["op"] for e in events if "op" in e and not e.get("ok")]
    passed = {e["op"] for e in events if e.get("ok")}
    running = next((op for op in reversed(started) if op not in passed), None)
    where = running or "start-up"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{where} killed by {name}"
    error = next((e["error"] for e in events if "error" in e), None)
    return f"{where}: {error}" if error else f"{where}: exit {code}"


def run_probe(job: dict, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(passed, note) of one child run of the probe."""
    started = time.monotonic()
    try:
        done = subprocess.run(probe_command(), input=json.dumps(job), capture_output=True,
                              text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    events = _events(done.stdout)
    seconds = time.monotonic() - started
    if done.returncode == 0:
        return True, f"passed {sum(1 for e in events if e.get('ok'))} ops in {seconds:.1f} s"
    log.info("kernel probe output:\n%s\n%s", done.stdout[-2000:], done.stderr[-4000:])
    return False, _reason(done.returncode, events)


def _model_config(spec):
    """The model's config.json, from where the trainer will load the model (cached by then)."""
    from transformers import AutoConfig

    from baton.training.model import is_local

    name, revision = spec.model.name, spec.model.revision
    local = is_local(name) or revision.startswith("local:")
    return AutoConfig.from_pretrained(name, revision=None if local else revision)


def decide(spec, device, say, tokens: int = PROBE_TOKENS) -> ProbeOutcome:
    """The kernel path this session trains on, probed where Triton would run, on `tokens`
    rows (the first micro-batch's)."""
    from baton.kernels.dispatch import NO_PATCHING, patching_enabled, select_backend

    if not patching_enabled():
        return ProbeOutcome(NO_PATCHING, "skipped: BATON_KERNELS=none, nothing patched")
    if select_backend(device.device) != "triton":
        return ProbeOutcome("reference", "skipped: the reference path runs no Triton kernel")
    try:
        config = _model_config(spec)
    except (OSError, ValueError) as exc:  # the trainer's load then says what is wrong
        log.warning("kernel probe skipped: the model's config did not load (%s)", exc)
        return ProbeOutcome("triton", "skipped: the model's config did not load")
    passed, note = run_probe(job_for(spec, device, config, tokens))
    if passed:
        say(f"kernel probe {note}")
        return ProbeOutcome("triton", note)
    say(f"warning: the Triton kernel probe failed ({note}); this session trains on the "
        "plain-PyTorch reference path (slower, same results). Report it with "
        "scripts/gpu_check.py's output; BATON_KERNELS=reference skips the probe.")
    return ProbeOutcome("reference", f"failed: {note}")


def kernels_text(kernels: str, probe: Optional[str]) -> str:
    """'reference (probe: lora_mlp killed by SIGABRT)' after a failed probe; 'triton (probe
    passed)', 'reference (probe skipped)'; the bare path for a record older than the probe."""
    if not probe:
        return kernels
    if probe.startswith("failed: "):
        return f"{kernels} (probe: {probe.removeprefix('failed: ')})"
    return f"{kernels} (probe {probe.split()[0].rstrip(':')})"
