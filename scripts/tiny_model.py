"""Build a tiny, random-initialised causal LM and its tokenizer, saved like a Hub checkpoint.

Tests and the demo need a real model folder (config, safetensors weights, fast tokenizer with a
chat template) without reaching a hub. The result is deterministic: the same arguments give the
same files. Keep `hidden` and `intermediate` multiples of 64 so NF4 (blocksize 64) quantizes them.

    python scripts/tiny_model.py OUT [--arch llama|mistral|qwen2]
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from pathlib import Path
from typing import Optional

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

# Prefix-stable on purpose: rendering messages[:i] with a generation prompt is a prefix of
# rendering messages[:i+1], which is how Baton finds the assistant spans to train on.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def default_corpus() -> list[str]:
    """Python's own stdlib source text: always present, varied, and identical on every run."""
    import argparse as a
    import json.decoder as jd

    texts = [inspect.getsource(m) for m in (textwrap, a, jd)]
    return [line for t in texts for line in t.splitlines() if line.strip()]


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()) + roles,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int,
                intermediate: int, vocab_size: int):
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
    config_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    config = config_cls(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return model_cls(config)


def build_tiny(out_dir: Path, arch: str = "llama", *, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               vocab_size: Optional[int] = None, corpus: Optional[list[str]] = None) -> Path:
    """Write a tiny model + tokenizer to `out_dir` and return it."""
    if hidden % 64 or intermediate % 64:
        raise ValueError("hidden and intermediate must be multiples of 64 (NF4 blocksize)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus or default_corpus(), vocab_size or 512)
    # The model's vocabulary covers every token id, rounded up to a multiple of 64.
    n_vocab = -(-len(tokenizer) // 64) * 64
    model = build_model(arch, tokenizer, hidden=hidden, layers=layers, heads=heads,
                        kv_heads=kv_heads, intermediate=intermediate, vocab_size=n_vocab)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    path = build_tiny(args.out, args.arch, hidden=args.hidden, layers=args.layers)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
