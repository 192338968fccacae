"""Load a written GGUF back with transformers' GGUF loader and check it against the merged model.

Three checks, each able to fail the export (exit 1, as merge's own verification):
- metadata: the config transformers rebuilds from the file's metadata agrees with the merged
  model's on every field it reads (sizes, heads, head_dim, eps, RoPE base, vocabulary);
- logits: the file's weights, dequantized by the loader into the merged model's architecture,
  give the merged model's logits within the file type's tolerance (TOLERANCE, derived in
  docs/DESIGN.md, "GGUF export"). The merged config is used for the model itself because the
  loader drops what it does not read (Gemma 3's per-layer RoPE scaling, Qwen 3's head_dim);
  the metadata check above covers what it does read;
- tokenizer: the tokenizer rebuilt from the file encodes held-out texts, and the chat template
  applied to a conversation, to the same ids as the merged folder's tokenizer.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Callable

# Max abs logit difference over the largest reference logit (at least 1). f16/bf16: merge's own
# bounds for the dtype's rounding. q8_0: a block of 32 weights shares one scale amax/127, so a
# weight is off by at most amax/254, twice bf16's worst case of |w| * 2^-9 <= amax/512; the
# logit error grows the same way, so twice bf16's bound. A wrong name, permutation or norm
# offset moves the logits by the order of the logits themselves, far past all three.
TOLERANCE = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings")
HELD_OUT = [
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Résumé: naïve café owners in Zürich ate 1234567 crêpes — 42% more than in 2023!",
    "  leading spaces,\ttabs and\n\nblank lines  ",
    "日本語のテキストと emoji 🚀 mixed in.",
    "x = [i**2 for i in range(10) if i % 3 == 0]  # comprehension",
]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three primes."},
        {"role": "assistant", "content": "2, 3, 5."},
        {"role": "user", "content": "And the next one?"}]


def check_metadata(folder: Path, gguf_file: Path) -> list[str]:
    """The fields where the config read back from the GGUF differs from the merged one."""
    from transformers import AutoConfig

    from baton.export.gguf_arch import head_dim, rope_params

    merged = AutoConfig.from_pretrained(folder)
    loaded = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    wrong = [f"{f}: {getattr(loaded, f)} != {getattr(merged, f)}" for f in CONFIG_FIELDS
             if not _same(getattr(loaded, f, None), getattr(merged, f))]
    if loaded.model_type.startswith("gemma") and head_dim(loaded) != head_dim(merged):
        wrong.append(f"head_dim: {head_dim(loaded)} != {head_dim(merged)}")
    base = float(rope_params(merged).get("rope_theta", 10000.0))
    if not _same(float(rope_params(loaded).get("rope_theta", base)), base):
        wrong.append(f"rope_theta: {rope_params(loaded).get('rope_theta')} != {base}")
    return wrong


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-6 * max(abs(b), 1e-30)
    return a == b


def logits_of(folder: Path, tokenizer, dtype, probe: Callable, **load) -> list:
    """The probe logits of the model at `folder` (or of a GGUF in it), then free it. Both
    models see the merged tokenizer's ids: the tokenizer is checked on its own."""
    from transformers import AutoModelForCausalLM

    # use_kernels=False: transformers' plain modules, with or without HF's `kernels`
    # (training.model.PLAIN_MODULES says why; this layer imports nothing of Baton's).
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_kernels=False,
                                                 **load).eval()
    try:
        return probe(model, tokenizer)
    finally:
        del model
        gc.collect()


def compare_logits(folder: Path, gguf_file: Path, kind: str, dtype, probe: Callable):
    """(max abs difference, tolerance or None for k-quants, largest reference logit,
    greedy-token agreement)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = logits_of(folder, tokenizer, dtype, probe)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type == "mistral":  # llama.cpp runs Mistral as `llama`, and so does the loader
        config = LlamaConfig.from_dict({**config.to_dict(), "model_type": "llama"})
    loaded = logits_of(gguf_file.parent, tokenizer, dtype, probe, gguf_file=gguf_file.name,
                       config=config)
    diff = max(float((r - m).abs().max()) for r, m in zip(reference, loaded))
    scale = max(float(r.abs().max()) for r in reference)
    agree = sum(int((r.argmax(-1) == m.argmax(-1)).sum()) for r, m in zip(reference, loaded))
    total = sum(r.shape[-2] for r in reference)
    tolerance = TOLERANCE[kind] * max(scale, 1.0) if kind in TOLERANCE else None
    return diff, tolerance, scale, agree / total


def tokenizer_mismatches(folder: Path, gguf_file: Path) -> list[str]:
    """The held-out texts (and the chat) whose ids differ between the two tokenizers."""
    from transformers import AutoTokenizer

    from transformers.integrations.gguf import get_gguf_tokenizer

    original = AutoTokenizer.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    wrong = [repr(t[:40]) for t in HELD_OUT
             if original(t).input_ids != loaded(t).input_ids]
    if original.chat_template:
        stored = get_gguf_tokenizer(str(gguf_file))[2].get("chat_template")
        chat = original.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        if stored != original.chat_template:
            wrong.append("the stored chat template")
        elif (original(chat, add_special_tokens=False).input_ids
              != loaded(chat, add_special_tokens=False).input_ids):
            wrong.append("the chat template's render")
    return wrong


def verify(folder: Path, gguf_path: Path, kind: str, dtype, probe: Callable) -> tuple[bool, str]:
    """All three checks; (ok, one message for the log and the provenance record). The file is
    read from a folder of its own, so nothing beside it (config.json, tokenizer_config.json)
    can stand in for what the GGUF lacks."""
    with tempfile.TemporaryDirectory(prefix="baton-gguf-") as alone:
        gguf_file = Path(alone) / gguf_path.name
        gguf_file.symlink_to(gguf_path.resolve())
        problems = check_metadata(folder, gguf_file)
        diff, tolerance, scale, agree = compare_logits(folder, gguf_file, kind, dtype, probe)
        if tolerance is not None and diff > tolerance:
            problems.append(f"logits differ by {diff:.3g} > tolerance {tolerance:.3g}")
        problems += [f"tokenizer encodes {t} differently"
                     for t in tokenizer_mismatches(folder, gguf_file)]
    bound = f"tolerance {tolerance:.3g}" if tolerance is not None else "no bound for a k-quant"
    message = (f"GGUF {gguf_file.name} reloaded by transformers vs the merged model: max abs "
               f"logit difference {diff:.3g} ({bound}, largest logit {scale:.3g}), greedy tokens "
               f"agree at {agree:.1%} of positions; metadata and tokenizer "
               + ("round-trip" if not problems else "checked"))
    if problems:
        message += ": " + "; ".join(problems)
    return not problems, message
