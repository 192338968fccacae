#!/usr/bin/env python
"""GGUF export, measured: conversion time, peak memory and the round-trip differences.

    python scripts/bench_gguf.py smollm2 [--kinds q8_0,f16,bf16] [--json OUT]
    python scripts/bench_gguf.py shaped  [--kind f16] [--json OUT]

`smollm2`: SmolLM2-135M-Instruct (scripts/real_model.py) converted to each kind in a fresh
process, which reports its wall time, its peak RSS (VmHWM), the RSS it had before the
conversion started (Python, torch, transformers and gguf imported) and the peaks of its heap
(RssAnon) and of its mapped safetensors pages (RssFile), sampled every 20 ms; then the file is checked
as merge.py checks it (baton.export.gguf_verify: logits in float32 against the merged model,
greedy-token agreement, metadata, tokenizer).

`shaped`: a model of Llama-3.2-1B's shape (hidden 2048, 16 layers, MLP 8192, 32/8 heads,
128,256-token vocabulary, tied embeddings: 1.24 B parameters, 2.5 GB in float16) with random
float16 weights written shard by shard, converted in a fresh process: the peak RSS against the
model's size is what "a tensor at a time" means.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
             num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             max_position_embeddings=131072, tie_word_embeddings=True, head_dim=64)


def _ensure_importable() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak RSS since exec;
    RssAnon: heap; RssFile: mapped file pages, which the kernel can drop under pressure)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class PeakSampler(threading.Thread):
    """The highest RssAnon and RssFile seen, sampled every 20 ms while the conversion runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            for field in self.peak:
                self.peak[field] = max(self.peak[field], status_mib(field))


def convert_here(folder: str, dest: str, kind: str) -> dict:
    """The conversion in this process (the child's side): time and memory."""
    _ensure_importable()
    import baton.export.gguf_write as gw
    import torch  # noqa: F401  (imported before the baseline is read)
    import transformers  # noqa: F401

    before = status_mib("VmRSS")
    sampler = PeakSampler()
    sampler.start()
    began = time.perf_counter()
    summary = gw.convert(Path(folder), Path(dest), kind)
    seconds = time.perf_counter() - began
    sampler.stop.set()
    sampler.join()
    return {"kind": kind, "seconds": round(seconds, 2), "peak_rss_mib": round(status_mib("VmHWM")),
            "rss_before_mib": round(before), "peak_anon_mib": round(sampler.peak["RssAnon"]),
            "peak_file_mib": round(sampler.peak["RssFile"]),
            "file_mib": round(summary["bytes"] / 2**20, 1), "tensors": summary["tensors"]}


def convert_fresh(folder: Path, dest: Path, kind: str) -> dict:
    """convert_here in a fresh Python, so its peak RSS is the conversion's alone."""
    code = ("import json, sys; sys.path.insert(0, %r); from scripts.bench_gguf import "
            "convert_here; print(json.dumps(convert_here(%r, %r, %r)))"
            % (str(ROOT), str(folder), str(dest), kind))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def smollm2(kinds: list[str], work: Path) -> list[dict]:
    import torch

    from baton.export.gguf_verify import verify
    from baton.scripts.merge import probe_logits
    from baton.scripts.real_model import ensure_model

    folder = ensure_model()
    rows = []
    for kind in kinds:
        dest = work / f"smollm2-{kind.upper()}.gguf"
        row = convert_fresh(folder, dest, kind)
        ok, message = verify(folder, dest, kind, torch.float32, probe_logits)
        rows.append({**row, "model": "SmolLM2-135M-Instruct",
                     "model_mib": round(folder_mib(folder)), "verified": ok, "check": message})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_shaped(folder: Path, max_shard: int = 2 * 2**30) -> Path:
    """A 1B-shaped Llama with random float16 weights, written a tensor at a time (the model is
    never whole in memory), with the tiny test tokenizer (padded by the export)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from baton.scripts.tiny_model import default_corpus, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE, torch_dtype="float16")
    with init_empty_weights():
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()
                  if n != "lm_head.weight"}
    generator = torch.Generator().manual_seed(0)
    shard, size, index = {}, 0, {}
    for name, shape in shapes.items():
        shard[name] = (torch.randn(shape, generator=generator) * 0.02).half()
        size += shard[name].numel() * 2
        if size >= max_shard or name == list(shapes)[-1]:
            file = f"model-{len(set(index.values())) + 1:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            index.update({n: file for n in shard})
            shard, size = {}, 0
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    config.save_pretrained(folder)
    train_tokenizer(default_corpus(), 512).save_pretrained(folder)
    return folder


def shaped(kind: str, work: Path) -> list[dict]:
    folder = write_shaped(work / "llama-1b-shaped")
    row = {**convert_fresh(folder, work / f"shaped-{kind.upper()}.gguf", kind),
           "model": "Llama-3.2-1B-shaped (random)", "model_mib": round(folder_mib(folder))}
    print(json.dumps(row), flush=True)
    return [row]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("smollm2", "shaped"))
    parser.add_argument("--kinds", default="q8_0,f16,bf16")
    parser.add_argument("--kind", default="f16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    _ensure_importable()
    with tempfile.TemporaryDirectory(prefix="baton-bench-gguf-") as tmp:
        rows = (smollm2(args.kinds.split(","), Path(tmp)) if args.what == "smollm2"
                else shaped(args.kind, Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
