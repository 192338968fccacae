#!/usr/bin/env python
"""What a session pays before it trains, measured: the data's encoding and Triton's compiles.

    python scripts/bench_startup.py data   [--records 20000] [--out DIR] [--json OUT]
    python scripts/bench_startup.py encode [--records 20000] [--json OUT]
    python scripts/bench_startup.py triton [--json OUT]

`data`: two real sessions of `agent.py run` on SmolLM2-135M-Instruct (scripts/real_model.py)
and about 20,000 chat records (the stdlib records of scripts/demo_data.py, repeated with
varied prompts), one store and one workdir: session 1 is stopped by SIGTERM after its first
step (it commits and pauses), session 2 resumes and finishes the second. The figures are each
session's record as stored (its phase timings when the record has them), so they are what
`agent.py status` reads; session 1 tokenizes and packs every record and stores the encoding,
session 2 loads it.

`encode`: the same data start-up in one process, the sessions side by side (session 1 encodes
and stores, session 2 loads on a fresh machine and on the same one), twice in turn.

`triton`: every Baton kernel compiled for a T4 (sm_75) and for sm_90, cold in a fresh process
with an empty TRITON_CACHE_DIR and again in a fresh process over the same folder, which is what
the first step of a session pays for kernel compilation without and with the workdir's cache
(no GPU is needed: Triton's compiler runs down to ptxas; launching is not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHRASES = ("{p}", "Write this Python function. {p}", "In Python: {p}", "Implement: {p}",
           "{p} Keep it short.", "Task: {p}", "Show the code. {p}", "{p} Use the stdlib only.")


def chat_records(count: int) -> list[dict]:
    """`count` chat records: the stdlib pairs, each round with other phrasings of the prompt."""
    from baton.scripts.demo_data import as_chat, build_pairs

    pairs = build_pairs(100_000)
    out = []
    for n in range(count):
        pair = pairs[n % len(pairs)]
        round_ = n // len(pairs)
        phrase = PHRASES[round_ % len(PHRASES)]
        prompt = phrase.format(p=pair["prompt"].strip())
        if round_ >= len(PHRASES):
            prompt += f" (variant {round_ // len(PHRASES)})"
        out.append(as_chat({"prompt": prompt, "completion": pair["completion"]}))
    return out


def write_run(folder: Path, records: int, model_dir: Path) -> Path:
    import yaml

    data = folder / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for record in chat_records(records):
            fh.write(json.dumps(record, sort_keys=True) + "\n")
    config = {
        "run": "startup", "store": str(folder / "store"),
        "model": {"name": str(model_dir), "load_in_4bit": False},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(data), "format": "chat", "eval": 0.0005, "max_seq_len": 256,
                 "packing": True},
        "train": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 1,
                  "optimizer": "adamw", "warmup": 0.0},
        "checkpoint": {"every": "30m", "keep": 2},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def session(config: Path, workdir: Path, stop_after_step: Optional[int]) -> tuple[int, str, float]:
    """One `agent.py run`; SIGTERM once `step N/` is printed when asked. (code, output, s)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "run", "--config",
                             str(config), "--workdir", str(workdir), "--log-every", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print("  | " + line.rstrip(), flush=True)
        if stop_after_step and re.match(rf"^step {stop_after_step}/", line):
            proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    return code, "".join(lines), time.perf_counter() - started


def bench_data(args) -> dict:
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.scripts.real_model import ensure_model

    folder = Path(args.out or tempfile.mkdtemp(prefix="baton-startup-"))
    folder.mkdir(parents=True, exist_ok=True)
    config = write_run(folder, args.records, ensure_model())
    results = []
    for number, stop in ((1, 1), (2, None)):
        print(f"session {number}:", flush=True)
        code, out, wall = session(config, folder / "work", stop)
        results.append({"session": number, "exit_code": code, "wall_s": round(wall, 2),
                        "cache": "loaded" if "loaded from" in out else
                        ("stored" if "stored as" in out else "none")})
    records = RunStore(open_store(str(folder / "store")), "startup").read_sessions()
    for row, record in zip(results, records):
        row["timings"] = getattr(record, "timings", None)
        if hasattr(row["timings"], "model_dump"):
            row["timings"] = row["timings"].model_dump()
    return {"records": args.records, "folder": str(folder), "sessions": results,
            **summary(results)}


def summary(results: list[dict]) -> dict:
    """The two goals: session 2's data time against session 1's, and the seconds from the
    loaded model to the first step (data attach and checkpoint pull; the base eval, which
    only the run's first session runs before step 1, is shown apart)."""
    timings = [row.get("timings") or {} for row in results]
    if len(timings) < 2 or not all(t.get("data") for t in timings):
        return {}
    first, second = timings[0], timings[1]
    return {"data_ratio": round(second["data"] / first["data"], 4),
            "to_first_step_s": [round(t["data"] + t["pull"], 2) for t in timings],
            "base_eval_s": round(first["eval"], 2)}


def bench_encode(args) -> dict:
    """The data start-up of session 1 (encode and store) and session 2 (load: from the store
    on a fresh machine, from the workdir on the same one), side by side in one process, twice
    in turn, so the machine's load falls on both alike."""
    from transformers import AutoTokenizer

    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.scripts.real_model import ensure_model
    from baton.session.datacache import StoreEncodedCache
    from baton.session.spec import new_spec
    from baton.state_schema import RunConfig
    from baton.training.dataset import RunData

    folder = Path(tempfile.mkdtemp(prefix="baton-encode-"))
    config = RunConfig.model_validate(__import__("yaml").safe_load(
        write_run(folder, args.records, ensure_model()).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(config.model.name)
    rows = {"session_1": [], "session_2_fresh_machine": [], "session_2_same_machine": []}
    for round_ in range(2):
        runstore = RunStore(open_store(str(folder / f"store{round_}")), config.run)
        spec = new_spec(runstore, config)
        for name, workdir in (("session_1", "w1"), ("session_2_fresh_machine", "w2"),
                              ("session_2_same_machine", "w2")):
            started = time.perf_counter()
            data = RunData(spec, Path(config.data.train),
                           cache=StoreEncodedCache(runstore, folder / f"{workdir}-{round_}",
                                                   lambda _line: None))
            data.attach(tokenizer)
            rows[name].append(round(time.perf_counter() - started, 3))
    best = {name: min(times) for name, times in rows.items()}
    return {"records": args.records, "seconds": rows, "n_train_blocks": data.n_train,
            "ratio_fresh": round(best["session_2_fresh_machine"] / best["session_1"], 4),
            "ratio_same": round(best["session_2_same_machine"] / best["session_1"], 4)}


def bench_triton(args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from baton.scripts.aot_kernels import compile_all; "
            "print(json.dumps(compile_all()))")
    with tempfile.TemporaryDirectory(prefix="baton-triton-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        runs = {}
        for name in ("cold", "cached"):
            done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=600, check=True)
            runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
    out = {"cache_bytes": size, "kernels": len(runs["cold"])}
    for sm in sorted({r["sm"] for r in runs["cold"]}):
        for name, rows in runs.items():
            out[f"sm{sm}_{name}_s"] = round(sum(r["seconds"] for r in rows if r["sm"] == sm), 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["data", "encode", "triton"])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--out", help="folder for the data, store and workdir (kept)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    result = {"data": bench_data, "encode": bench_encode, "triton": bench_triton}[args.what](args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
