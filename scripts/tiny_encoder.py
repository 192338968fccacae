"""Build a tiny, random-initialised RoBERTa-shaped encoder and its tokenizer, saved like a Hub
checkpoint, for the encoder path of classification (tests and `demo.py --task classification
--tiny`).

The tokenizer is a byte-level BPE trained on Python's own stdlib source (as scripts/tiny_model.py
does for the tiny Llama) with RoBERTa's special tokens and templates: `<s> A </s>` for one text,
`<s> A </s></s> B </s>` for a pair. The same arguments give the same files.

    python scripts/tiny_encoder.py OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/tiny_encoder.py` puts scripts/ on the path
    sys.path.insert(0, str(ROOT))

SPECIAL = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    cls, sep = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.RobertaProcessing(
        (sep, tok.token_to_id(sep)), (cls, tok.token_to_id(cls)), add_prefix_space=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=cls, eos_token=sep, sep_token=sep, cls_token=cls,
        pad_token=SPECIAL["pad"], unk_token=SPECIAL["unk"], mask_token=SPECIAL["mask"])


def build_tiny_encoder(out_dir: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                       intermediate: int = 128, vocab_size: int = 512,
                       corpus: Optional[list[str]] = None) -> Path:
    """Write a tiny RoBERTa (RobertaForMaskedLM weights: the encoder a classifier starts from,
    without a head) and its tokenizer to `out_dir`; return it."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from baton.scripts.tiny_model import default_corpus

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus or default_corpus(), vocab_size)
    config = RobertaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(build_tiny_encoder(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
