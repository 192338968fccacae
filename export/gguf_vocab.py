"""The tokenizer in a GGUF: tokens, scores, types, merges, special ids and the chat template.

The gguf package reads the files: `BpeVocab` a byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM),
`LlamaHfVocab` a byte-fallback BPE made from a SentencePiece model (Mistral, Gemma), and
`SpecialVocab` the merges, special ids, add-BOS/EOS flags and the chat template. Two things are
ours, both as llama.cpp's converter does them:
- token types from tokenizer.json's added tokens (special -> CONTROL, else USER_DEFINED): the
  vocab classes only mark tokens past the base vocabulary, and a chat marker like `<|im_start|>`
  typed NORMAL would be cut into pieces by every GGUF runtime;
- SentencePiece scores: llama.cpp's SPM tokenizer merges the best-scored pair first, and
  `LlamaHfVocab` gives every token -1000, so the score is minus the rank of the merge that
  makes the token (the same order the BPE merges encode).
And the pre-tokenizer name llama.cpp needs, read off tokenizer.json's split rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from baton.export.errors import ExportError

# Preferred llama.cpp pre-tokenizer names where transformers' table maps several to one regex.
PREFERRED_PRE = ("llama-bpe", "qwen2", "tekken", "gpt-4o")


def write_vocab(writer, folder: Path, n_vocab: int) -> dict:
    """Write the tokenizer of the merged `folder` into `writer`; return a summary for the log."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the tokenizer as transformers runs it: a tokenizer class (Qwen2's, Gemma's) rebuilds its
    # own normalizer and pre-tokenizer over tokenizer.json's vocabulary
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, model, pre = _vocab_of(folder, data)
    tokens, scores, types = _token_table(vocab, data, n_vocab)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_add_space_prefix(_adds_space_prefix(data))
    special = _special_vocab(folder, tokenizer, len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return {"model": model, "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "chat_template": special.chat_template is not None}


def check_tokenizer(tokenizer) -> None:
    """ExportError now, before any work, for a tokenizer the export would refuse later."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    if _is_byte_level(data):
        byte_level_pre(data)
    elif not data["model"].get("byte_fallback"):
        raise ExportError("the tokenizer is neither byte-level BPE nor byte-fallback BPE; the "
                          "GGUF export does not support it, drop --gguf")


def _vocab_of(folder: Path, data: dict):
    """(the gguf vocab reader, tokenizer.ggml.model, tokenizer.ggml.pre) for this tokenizer."""
    try:
        if _is_byte_level(data):
            return gguf.BpeVocab(folder), "gpt2", byte_level_pre(data)
        if data["model"].get("byte_fallback"):
            return _RankedHfVocab(folder), "llama", "default"
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise ExportError(f"the tokenizer cannot be read for GGUF ({exc}); drop --gguf") from exc
    raise ExportError("the tokenizer is neither byte-level BPE nor byte-fallback BPE; the GGUF "
                      "export does not support it, drop --gguf")


def _special_vocab(folder: Path, tokenizer, n_tokens: int):
    """gguf's SpecialVocab (merges, special ids, chat template), with the add-BOS/EOS flags
    set from what the tokenizer does, not from what a config may leave unsaid (runtimes
    default differently per tokenizer type)."""
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_tokens)
    ids = tokenizer("x").input_ids
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return special


def _is_byte_level(data: dict) -> bool:
    return (data["model"]["type"] == "BPE" and not data["model"].get("byte_fallback")
            and (data.get("decoder") or {}).get("type") == "ByteLevel")


def _token_table(vocab, data: dict, n_vocab: int) -> tuple[list, list, list]:
    """(tokens, scores, types), typed from tokenizer.json's added tokens and padded to the
    model's vocabulary size with unused placeholders, as llama.cpp expects one row a token."""
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for added in data.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = (gguf.TokenType.CONTROL if added.get("special")
                                  else gguf.TokenType.USER_DEFINED)
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model's embedding "
                          f"only {n_vocab} rows; resize the embeddings before exporting")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def byte_level_pre(data: dict) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer (`tokenizer.ggml.pre`)."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    split = next((s for s in steps if s.get("type") == "Split"), None)
    if split is not None:
        name = _pre_of_regex((split.get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ExportError(f"the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} has no known "
                      "llama.cpp name; the GGUF export cannot say how to split text, drop --gguf")


def _pre_of_regex(regex) -> str:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    names = [name for name, rx in GGUF_PRE_TOKENIZER_SPLITS.items() if rx == regex]
    preferred = [name for name in PREFERRED_PRE if name in names]
    return (preferred or names or [""])[0]


def _adds_space_prefix(data: dict) -> bool:
    """Whether the SentencePiece model prepends '▁' to the text (Llama 2, Mistral: yes;
    Gemma: no), read from the normalizer (Prepend) or the Metaspace pre-tokenizer ("first":
    to the text's start, which is what llama.cpp's add_space_prefix does)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return any(mark in text for mark in ('"Prepend"', '"prepend_scheme": "always"',
                                         '"prepend_scheme": "first"'))


class _RankedHfVocab(gguf.LlamaHfVocab):
    """`LlamaHfVocab` with SentencePiece scores recovered from the merges' order."""

    def __init__(self, path: Path):
        super().__init__(path)
        data = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = self.tokenizer.get_vocab()
        self.ranks: dict[int, int] = {}
        for rank, merge in enumerate(data["model"].get("merges", [])):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            self.ranks.setdefault(vocab.get(left + right), rank)

    def get_token_score(self, token_id: int) -> float:
        return -float(self.ranks[token_id]) if token_id in self.ranks else 0.0
