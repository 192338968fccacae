"""Write a merged safetensors folder as one GGUF file, a tensor at a time.

Two passes over the safetensors headers and data: the first reads only names and shapes (the
tensor infos go before any data in a GGUF), the second loads one tensor, transforms and
quantizes it (through float32 a block of rows at a time), writes it and lets it go, so the
peak memory is about the largest tensor in the file's type and one mapped shard, not the model (docs/BENCHMARKS.md, "GGUF export").

Types follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; the matrices take the
file's type, and a Q8_0 matrix whose rows are not a multiple of 32 falls back to F16.
K-quants (Q4_K_M) come from llama.cpp's own `llama-quantize` run on the F16 file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from baton.export import gguf_arch
from baton.export.errors import ExportError
from baton.export.gguf_vocab import write_vocab

Q = gguf.GGMLQuantizationType
FILE_TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
              "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
K_QUANTS = {"q4_k_m": "Q4_K_M"}
CHOICES = tuple(FILE_TYPES) + tuple(K_QUANTS)


@dataclass(frozen=True)
class Planned:
    name: str  # llama.cpp's
    hf_name: str
    shard: str  # file name in the folder, "" for a tensor made from the config
    shape: tuple
    qtype: "gguf.GGMLQuantizationType"


def gguf_path(out: Path, stem: str, kind: str) -> Path:
    return out / f"{stem}-{kind.upper()}.gguf"


def convert(folder: Path, dest: Path, kind: str, *, name: str = "") -> dict:
    """Write the merged model in `folder` to `dest` as `kind` (f16, bf16, q8_0); return a
    summary (architecture, tokenizer, tensor count, bytes)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    arch = gguf_arch.arch_of(config)
    plan = list(_plan(folder, config, arch, kind))
    writer = gguf.GGUFWriter(dest, arch.gguf_name)
    writer.add_name(name or folder.name)
    writer.add_file_type(FILE_TYPES[kind][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    gguf_arch.write_metadata(writer, arch, config)
    vocab = write_vocab(writer, folder, config.vocab_size)
    for item in plan:
        nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(item.shape, item.qtype)))
        writer.add_tensor_info(item.name, item.shape, np.float32, nbytes, raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item, tensor in _stream(folder, config, arch, plan):
        writer.write_tensor_data(_encode(tensor, item.qtype))
    writer.close()
    return {"architecture": arch.gguf_name, "tensors": len(plan), "bytes": dest.stat().st_size,
            **{f"tokenizer_{k}": v for k, v in vocab.items()}}


def _shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ExportError(f"{folder} has no safetensors weights to export")


def _plan(folder: Path, config, arch, kind: str) -> Iterator[Planned]:
    from safetensors import safe_open

    names = gguf_arch.name_map(arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for shard in _shards(folder):
        with safe_open(folder / shard, framework="pt") as f:
            for hf_name in f.keys():
                if tied and hf_name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                name = gguf_arch.gguf_name(names, hf_name)
                if name is not None:
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    yield Planned(name, hf_name, shard, shape, tensor_type(shape, kind))
    for name, tensor in gguf_arch.extra_tensors(config):
        yield Planned(name, name, "", tuple(tensor.shape), Q.F32)


def tensor_type(shape: tuple, kind: str):
    if len(shape) < 2:
        return Q.F32
    qtype = FILE_TYPES[kind][0]
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _stream(folder: Path, config, arch, plan: list) -> Iterator[tuple]:
    """(planned, torch tensor in its stored dtype, transformed) in plan order, one tensor in
    memory at a time."""
    from safetensors import safe_open

    extra = dict(gguf_arch.extra_tensors(config))
    handles: dict = {}
    try:
        for item in plan:
            if not item.shard:
                yield item, extra[item.name]
                continue
            if item.shard not in handles:
                for done in list(handles):  # one shard open at a time: its pages can go
                    handles.pop(done).__exit__(None, None, None)
                handles[item.shard] = safe_open(folder / item.shard, framework="pt").__enter__()
            tensor = handles[item.shard].get_tensor(item.hf_name)
            yield item, gguf_arch.transform(arch, config, item.hf_name, tensor)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)


def _encode(tensor, qtype, chunk_bytes: int = 64 * 2**20) -> np.ndarray:
    """The tensor's bytes in the file's type. A float16 tensor headed for F16 is written as it
    is; anything else goes through float32 a block of rows at a time (about 64 MiB), so a large
    embedding is never whole in float32 (bfloat16, which numpy lacks, included)."""
    import torch

    if tensor.dtype == torch.float16 and qtype == Q.F16:
        return tensor.contiguous().numpy().view(np.uint8)
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, chunk_bytes // (4 * rows.shape[1]))
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(torch.float32).numpy()
        out[start:start + step] = gguf.quants.quantize(block, qtype).view(np.uint8)
    return out


def k_quantize(f16_path: Path, dest: Path, kind: str, *, timeout: float = 6 * 3600) -> None:
    """Run llama.cpp's `llama-quantize` on the F16 file; ExportError when it is not on PATH."""
    binary = require_llama_quantize(kind)
    done = subprocess.run([binary, str(f16_path), str(dest), K_QUANTS[kind]],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not dest.is_file():
        tail = (done.stderr or done.stdout or "").strip()[-800:]
        raise RuntimeError(f"llama-quantize exited {done.returncode}: {tail}")


def require_llama_quantize(kind: str) -> str:
    """The path of `llama-quantize`; ExportError naming what to install when it is not on PATH."""
    binary = shutil.which("llama-quantize")
    if binary is None:
        raise ExportError(f"--gguf {kind} needs llama.cpp's `llama-quantize` on PATH (install "
                          "llama.cpp: `brew install llama.cpp`, a release from "
                          "github.com/ggml-org/llama.cpp/releases, or your distribution's "
                          "package), or choose --gguf q8_0, which needs nothing else")
    return binary
