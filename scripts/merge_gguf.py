"""merge.py's GGUF step: `--gguf f16|bf16|q8_0|q4_k_m` and `--gguf-only`.

After the merged folder is saved and verified, write `<run>-<TYPE>.gguf` into the output
folder with an Ollama `Modelfile` and a model card (README.md), then load the file back and
check it (baton.export.gguf_verify). With `--gguf-only` the merged safetensors go to a hidden
folder inside the output and are removed once the GGUF is written and checked. The request is
validated before anything is merged or written (a classifier, an architecture or a tokenizer
the export does not cover, a k-quant without `llama-quantize`): ExportError, exit 2.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Callable, Optional

from baton.export import gguf_write
from baton.export.errors import ExportError

HIDDEN = ".merged-safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", choices=gguf_write.CHOICES, help="also write a GGUF file for "
                        "llama.cpp, Ollama and LM Studio (q4_k_m needs llama.cpp's "
                        "llama-quantize on PATH)")
    parser.add_argument("--gguf-only", action="store_true", help="keep only the GGUF (and its "
                        "Modelfile), not the merged safetensors folder")


def check_request(args: argparse.Namespace, spec, source: str, revision: Optional[str]) -> None:
    """Refuse, before any work, what cannot end in a GGUF."""
    from transformers import AutoConfig, AutoTokenizer

    from baton.export.gguf_arch import arch_of
    from baton.export.gguf_vocab import check_tokenizer
    from baton.training.classify import is_classifier

    if args.gguf_only and not args.gguf:
        raise ExportError("--gguf-only needs --gguf f16|bf16|q8_0|q4_k_m")
    if not args.gguf:
        return
    if is_classifier(spec):
        raise ExportError("this run trains a classifier; GGUF runtimes (llama.cpp, Ollama, LM "
                          "Studio) serve causal language models only: drop --gguf")
    if args.gguf in gguf_write.K_QUANTS:
        gguf_write.require_llama_quantize(args.gguf)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return  # loading the base reports this with its own message
    arch_of(config)
    check_tokenizer(tokenizer)


def merged_folder(args: argparse.Namespace) -> Path:
    return args.out / HIDDEN if args.gguf_only else args.out


def export(args: argparse.Namespace, folder: Path, probe: Callable) -> tuple[bool, str]:
    """Write, check and describe the GGUF of the merged `folder`; (ok, message)."""
    from baton.export.gguf_verify import verify

    kind, out = args.gguf, args.out
    base = "f16" if kind in gguf_write.K_QUANTS else kind
    path = gguf_write.gguf_path(out, args.run, base)
    summary = gguf_write.convert(folder, path, base, name=args.run)
    print(f"GGUF written: {path} ({summary['bytes'] / 2**20:.1f} MiB, {summary['tensors']} "
          f"tensors, {summary['architecture']}, tokenizer {summary['tokenizer_model']}/"
          f"{summary['tokenizer_pre']})")
    ok, message = verify(folder, path, base, _dtype(args.dtype), probe)
    if ok and kind in gguf_write.K_QUANTS:
        final = gguf_write.gguf_path(out, args.run, kind)
        gguf_write.k_quantize(path, final, kind)
        _, quant_message = verify(folder, final, kind, _dtype(args.dtype), probe)
        path.unlink()
        path, message = final, message + "\n" + quant_message
    if ok:
        _describe(args, folder, path)
    if args.gguf_only:
        shutil.rmtree(folder)
    return ok, message


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _describe(args: argparse.Namespace, folder: Path, path: Path) -> None:
    """The Modelfile beside the GGUF, and the model card that says how to run both."""
    import json

    from transformers import AutoTokenizer

    from baton.export.modelfile import write_modelfile

    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = folder / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    modelfile, why = write_modelfile(args.out, path.name, tokenizer, eos_ids)
    print(f"Ollama Modelfile: {modelfile}" + (f" (no TEMPLATE: {why})" if why else ""))
    (args.out / "README.md").write_text(model_card(args.run, path.name, args.push_to_hub,
                                                   gguf_only=args.gguf_only))


def model_card(run: str, gguf_name: str, repo: Optional[str], *, gguf_only: bool) -> str:
    name = run.lower().replace("_", "-")
    pull = (f"\nOr straight from the Hub: `ollama run hf.co/{repo}` (Ollama picks the GGUF), "
            f"`llama-cli -hf {repo}`.\n" if repo else "")
    transformers = ("" if gguf_only else "\nWith transformers: "
                    "`AutoModelForCausalLM.from_pretrained(<this folder>)`.\n")
    return f"""---
tags: [baton, gguf]
---
# {run}

Fine-tuned with Baton (LoRA merged into the base model) and exported to
GGUF: `{gguf_name}`, checked against the merged model (see `baton_merge.json`).

## Run it

Ollama (the Modelfile holds the chat template and the stop tokens):

    ollama create {name} -f Modelfile
    ollama run {name}

llama.cpp:

    llama-cli -m {gguf_name} -cnv

LM Studio: load `{gguf_name}`.
{pull}{transformers}"""
