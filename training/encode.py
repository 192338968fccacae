"""Records -> token ids and labels, with the loss masked to what the model should learn.

Labels are -100 (ignored by the loss) on prompts and on non-assistant chat turns. Chat records
are rendered with the tokenizer's own chat template; the assistant spans are found by rendering
each prefix of the conversation, so any prefix-stable template works without special markers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .data import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    # Set on packed blocks only: positions restart at 0 at each sample, which is how the
    # varlen attention (training/attention.py) tells the samples apart.
    position_ids: Optional[list[int]] = None

    @property
    def label_tokens(self) -> int:
        """Tokens that carry loss after the causal shift (the first position predicts nothing)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


class Encoder:
    def __init__(self, tokenizer, fmt: str, max_seq_len: int, *, train_on_prompt: bool = False):
        self.tok = tokenizer
        self.fmt = fmt
        self.max_seq_len = max_seq_len
        self.train_on_prompt = train_on_prompt
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos token; set tokenizer.eos_token in the model")

    def __call__(self, record: dict[str, Any]) -> Encoded:
        encode = {"text": self._text, "pairs": self._pairs, "chat": self._chat}[self.fmt]
        enc = encode(record)
        return Encoded(enc.input_ids[: self.max_seq_len], enc.labels[: self.max_seq_len])

    def prompt_ids(self, text: str) -> list[int]:
        """A pairs or text prompt as training saw it (bos, when the tokenizer adds one, then
        the text), for generating an answer to it."""
        return self._bos() + self._ids(text)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        bos = self.tok.bos_token_id
        return [bos] if bos is not None and getattr(self.tok, "add_bos_token", True) else []

    def _text(self, record) -> Encoded:
        ids = self._bos() + self._ids(str(record["text"])) + [self.tok.eos_token_id]
        return Encoded(ids, list(ids))

    def _pairs(self, record) -> Encoded:
        prompt = self._bos() + self._ids(str(record["prompt"]))
        completion = self._ids(str(record["completion"])) + [self.tok.eos_token_id]
        masked = list(prompt) if self.train_on_prompt else [IGNORE] * len(prompt)
        return Encoded(prompt + completion, masked + completion)

    def _chat(self, record) -> Encoded:
        messages = record["messages"]
        if not getattr(self.tok, "chat_template", None):
            raise DataError("chat data needs a tokenizer with a chat_template; this model has "
                            "none: use pairs data or a model with a template")
        text = self._render(messages, generation=False)
        spans = self._assistant_spans(messages, text)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            tid if self.train_on_prompt or any(s <= start < e for s, e in spans) else IGNORE
            for tid, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return Encoded(list(enc["input_ids"]), labels)

    def _render(self, messages, *, generation: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation)

    def _assistant_spans(self, messages, full: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in `full`, the whole rendered conversation."""
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self._render(messages[:i], generation=True) if i else ""
            through = self._render(messages[: i + 1], generation=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError("the tokenizer's chat template renders a conversation's start "
                                "differently from the whole; give the data as prompt/completion "
                                "pairs instead")
            spans.append((len(before), len(through)))
        if not spans:
            raise DataError("a chat record has no assistant turn to train on; every "
                            "conversation needs at least one {'role': 'assistant'} message")
        return spans


def pack(samples: list[Encoded], max_seq_len: int) -> list[Encoded]:
    """Whole samples, in order, into blocks of at most max_seq_len tokens (a sample that does
    not fit starts the next block: none is cut in two), with per-sample position_ids.

    Each sample's first token carries no label: in a block the token before it is the end of
    another sample, and predicting across that seam would teach noise. So a packed sample's
    loss is exactly its loss alone, where the first token predicts nothing either."""
    blocks: list[Encoded] = []
    for s in samples:
        if not blocks or len(blocks[-1].input_ids) + len(s.input_ids) > max_seq_len:
            blocks.append(Encoded([], [], []))
        block = blocks[-1]
        block.input_ids += s.input_ids
        block.labels += [IGNORE] + s.labels[1:]
        block.position_ids += list(range(len(s.input_ids)))
    return blocks


def collate(samples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample of the micro-batch (the padded layout; padding-free
    rows are training/layout.py's).

    Packed blocks get position_ids and no attention_mask: the trainer's varlen attention
    (training/attention.py) reads the samples from restarting positions (plain transformers
    would build a block-diagonal mask from them). Right padding needs no mask there: causal
    attention never looks right, and padding carries no label."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
        own = s.position_ids if s.position_ids is not None else range(n)
        positions[row, :n] = torch.tensor(list(own))
        positions[row, n:] = torch.arange(width - n)  # padding: a segment of its own
    if any(s.position_ids is not None for s in samples):
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
