#!/usr/bin/env python
"""Fold a run's LoRA adapter into its base model and save a plain transformers model.

    python scripts/merge.py --store URI --run NAME --out DIR [--checkpoint ID]
                            [--dtype float16|bfloat16|float32] [--base-model PATH_OR_ID]
                            [--max-shard-size 2GB] [--push-to-hub REPO]
                            [--gguf f16|bf16|q8_0|q4_k_m] [--gguf-only]

The checkpoint (HEAD's, or the one named) is pulled and every file checked against its
manifest. The base model is loaded in 16 (or 32) bits, never 4: merging into NF4 weights would
round the update away. The merged model is saved as sharded safetensors with the tokenizer,
then loaded back from disk and its logits compared with base + adapter on a few inputs; a
difference over the tolerance exits 1. `--gguf` also writes a GGUF file for llama.cpp and
Ollama with its Modelfile, checked the same way (scripts/merge_gguf.py). Exit codes: 0 merged
and verified, 1 verification failed or an unexpected error, 2 invalid input (run, checkpoint,
base model, output folder, a GGUF request the model cannot meet).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
# Tolerance on the max abs logit difference, relative to the largest reference logit: merging
# W + s*B@A in the target dtype rounds once per weight, which is the dtype's unit roundoff
# (fp32 ~6e-8, bf16 ~4e-3, fp16 ~5e-4), grown through the layers; the factors leave room for that
# and still catch a missing or wrongly scaled adapter, which moves logits by far more.
REL_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
PROBES = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "Write a Python function that returns the sum of a list.",
]


class MergeError(Exception):
    """Invalid input: the message says what and how to fix it (exit 2)."""


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge a Baton run's adapter into its base model")
    parser.add_argument("--store", required=True, help="the run's store URI")
    parser.add_argument("--run", required=True, help="the run's name")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    parser.add_argument("--checkpoint", help="a checkpoint id like 00000120-g3 (default: HEAD's)")
    parser.add_argument("--dtype", default="float16", choices=sorted(REL_TOLERANCE))
    parser.add_argument("--base-model", help="load the base from this folder or Hub id instead "
                        "of the spec's model.name (e.g. a copy on this machine)")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size")
    parser.add_argument("--atol", type=float, help="absolute tolerance on the logit difference "
                        "(default: a dtype-relative one, see REL_TOLERANCE)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the merged model to this "
                        "private Hub repo (needs HF_TOKEN with write access)")
    _ensure_importable()
    from baton.scripts.merge_gguf import add_arguments

    add_arguments(parser)
    return parser.parse_args(argv)


def _ensure_importable() -> None:
    """`python scripts/merge.py` puts scripts/ on sys.path, not the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# -- the checkpoint ----------------------------------------------------------------------

def pull(runstore, checkpoint: Optional[str], dest: Path):
    """(checkpoint id, folder): HEAD's checkpoint with fallback, or the named one, verified."""
    from baton.handoff.checkpoint import pull_chosen

    ref = pull_chosen(runstore, checkpoint, dest)
    if ref is None:
        raise MergeError(f"run {runstore.run!r} has no checkpoint yet; run a session first")
    if ref.fell_back:
        print(f"warning: HEAD's checkpoint {ref.previous_bad} failed verification; merging the "
              f"older {ref.id} (step {ref.step}) instead", file=sys.stderr)
    return ref.id, ref.path


def describe_progress(runstore, cid: str, folder: Path) -> str:
    """One line on what is merged; warns when the run has not finished."""
    from baton.state_schema import Cursor

    cursor = Cursor.from_json((folder / "cursor.json").read_bytes(), source=f"{cid}/cursor.json")
    line = f"checkpoint {cid}: step {cursor.step} of {cursor.total_steps}"
    if not cursor.finished:
        line += " (the run is not finished: this is an intermediate adapter)"
    return line


# -- the models --------------------------------------------------------------------------

def base_source(spec, override: Optional[str]) -> tuple[str, Optional[str]]:
    """(where to load the base from, revision or None for a folder)."""
    if override:
        return override, None
    name, revision = spec.model.name, spec.model.revision
    if revision.startswith("local:") or Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise MergeError(f"the run's base model is the local folder {name}, which is not on "
                             "this machine; pass --base-model with a copy of it")
        _check_local_revision(folder, revision)
        return str(folder), None
    return name, revision


def _check_local_revision(folder: Path, revision: str) -> None:
    import hashlib

    if revision.startswith("local:"):
        found = "local:" + hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
        if found != revision:
            print(f"warning: {folder}/config.json differs from the one the run was trained on",
                  file=sys.stderr)


def head_of(spec, tokenizer) -> dict:
    """A classification run's head (size, label names, pad id for the pooling), else {}."""
    from baton.training.classify import head_kwargs, is_classifier

    if not is_classifier(spec):
        return {}
    if tokenizer.pad_token_id is None:  # as the trainer does: the pooling needs a pad id
        tokenizer.pad_token = tokenizer.eos_token
    return head_kwargs(spec, tokenizer.pad_token_id)


def load_adapted(source: str, revision: Optional[str], adapter_dir: Path, dtype: str, spec):
    """(base + adapter as a PeftModel in `dtype`, tokenizer); the base is loaded with the Auto
    class of the run's task, so a classifier's trained head comes back from modules_to_save."""
    import time

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from baton.training.classify import auto_class
    from baton.training.model import PLAIN_MODULES, loading_bars

    began = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        with loading_bars():  # one line below instead of the bar, off a terminal
            base = auto_class(spec).from_pretrained(source, revision=revision,
                                                    dtype=getattr(torch, dtype),
                                                    **head_of(spec, tokenizer),
                                                    **PLAIN_MODULES)
    except (OSError, ValueError) as exc:
        raise MergeError(f"cannot load the base model {source!r}: {exc}. Pass --base-model with "
                         "a folder or Hub id of the run's base model (HF_TOKEN if gated)") from exc
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    print(f"model loaded in {time.perf_counter() - began:.1f} s: {source} in {dtype} with the "
          f"adapter of {adapter_dir.name}")
    return model.eval(), tokenizer


def probe_logits(model, tokenizer) -> list:
    """fp32 logits of the probe texts, one tensor each (no padding to get wrong)."""
    import torch

    outputs = []
    with torch.no_grad():
        for text in PROBES:
            ids = tokenizer(text, return_tensors="pt").input_ids
            outputs.append(model(input_ids=ids).logits.float())
    return outputs


def max_abs_diff(reference: list, merged: list) -> tuple[float, float]:
    """(max abs difference, max abs reference logit)."""
    diff = max(float((r - m).abs().max()) for r, m in zip(reference, merged))
    scale = max(float(r.abs().max()) for r in reference)
    return diff, scale


# -- merge, save, verify -----------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not an empty folder; choose a new --out or "
                         "delete it first")


def merge_and_save(model, tokenizer, out: Path, max_shard_size: str) -> list:
    """Take the reference logits of base + adapter, then merge in place and save sharded
    safetensors and the tokenizer; return the reference logits."""
    reference = probe_logits(model, tokenizer)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return reference


def verify_saved(out: Path, dtype: str, reference: list, atol: Optional[float],
                 auto=None) -> tuple[bool, str]:
    """Reload the saved folder with plain transformers (the Auto class of the run's task) and
    compare logits with base + adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baton.training.model import PLAIN_MODULES, loading_bars

    auto = auto or AutoModelForCausalLM
    with loading_bars():
        reloaded = auto.from_pretrained(out, dtype=getattr(torch, dtype), **PLAIN_MODULES).eval()
    logits = probe_logits(reloaded, AutoTokenizer.from_pretrained(out))
    diff, scale = max_abs_diff(reference, logits)
    tolerance = atol if atol is not None else REL_TOLERANCE[dtype] * max(scale, 1.0)
    ok = diff <= tolerance
    verdict = "ok" if ok else "OVER the tolerance"
    return ok, (f"max abs logit difference, merged (reloaded from {out}) vs base + adapter: "
                f"{diff:.3g} (tolerance {tolerance:.3g}, largest logit {scale:.3g}): {verdict}")


def write_provenance(out: Path, run: str, store_uri: str, cid: str, source: str, dtype: str,
                     message: str) -> None:
    import json

    record = {"run": run, "store": store_uri, "checkpoint": cid, "base_model": source,
              "dtype": dtype, "verification": message}
    (out / "baton_merge.json").write_text(json.dumps(record, indent=2) + "\n")


def push(out: Path, repo: str) -> str:
    """Upload the merged folder to a private Hub model repo; return its URL."""
    import os

    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None,
                token=os.environ.get("HF_TOKEN") or None)
    url = api.create_repo(repo, private=True, exist_ok=True, repo_type="model")
    api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model",
                      commit_message="Merged model from Baton")
    return str(url)


def merge(args: argparse.Namespace) -> int:
    """The whole merge; MergeError for invalid input."""
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.session.codes import FAILED, OK

    from baton.scripts import merge_gguf

    check_out_dir(args.out)
    store = open_store(args.store)
    try:
        runstore = RunStore(store, args.run)
        spec = runstore.read_spec()
        if spec is None:
            raise MergeError(f"no run {args.run!r} in store {args.store}; check --run and --store")
        source, revision = base_source(spec, args.base_model)
        merge_gguf.check_request(args, spec, source, revision)
        target = merge_gguf.merged_folder(args)
        with tempfile.TemporaryDirectory(prefix="baton-merge-") as tmp:
            cid, folder = pull(runstore, args.checkpoint, Path(tmp) / "checkpoint")
            print(describe_progress(runstore, cid, folder))
            model, tokenizer = load_adapted(source, revision, folder, args.dtype, spec)
            reference = merge_and_save(model, tokenizer, target, args.max_shard_size)
    finally:
        store.close()
    del model
    gc.collect()  # the reload below should not hold two copies of a 7B model
    from baton.training.classify import auto_class

    ok, message = verify_saved(target, args.dtype, reference, args.atol, auto_class(spec))
    print(message)
    if ok and args.gguf:
        ok, gguf_message = merge_gguf.export(args, target, probe_logits)
        print(gguf_message)
        message += "\n" + gguf_message
    write_provenance(args.out, args.run, args.store, cid, source, args.dtype, message)
    if not ok:
        print(f"error: the model in {args.out} does not reproduce base + adapter; do not use it "
              "(try --dtype float32, or report the difference)", file=sys.stderr)
        return FAILED
    print(f"{'GGUF' if args.gguf_only else 'merged model'} saved to {args.out}")
    if args.push_to_hub:
        print(f"pushed to {push(args.out, args.push_to_hub)} (private)")
    return OK


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    _ensure_importable()
    from baton.handoff.secrets import scrub
    from baton.handoff.errors import StoreError, StoreUnavailableError
    from baton.session.codes import FAILED, INVALID
    from baton.session.quiet import silence_bnb_kernel_notice
    from baton.export.errors import ExportError

    silence_bnb_kernel_notice()
    try:
        return merge(args)
    except StoreUnavailableError as exc:
        print(scrub(f"error: the store stayed unreachable: {exc}; try again"), file=sys.stderr)
        return FAILED
    except (MergeError, StoreError, ExportError) as exc:
        print(scrub(f"error: {exc}"), file=sys.stderr)
        return INVALID


if __name__ == "__main__":
    raise SystemExit(main())
