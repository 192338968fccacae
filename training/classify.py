"""Sequence classification: the model class and head, the padded batch, the loss, the eval.

A classification run loads the base with AutoModelForSequenceClassification: decoders (Llama,
Mistral, Qwen2, Gemma) get a `score` head over the last non-pad token (transformers finds it
from `config.pad_token_id`, so the pad id is set on the config), encoders (BERT, RoBERTa,
XLM-R) a `classifier` over the first token. LoRA's task type is SEQ_CLS, so PEFT puts the head
in `modules_to_save`: it is trained in full and saved in adapter_model.safetensors beside the
LoRA weights, and a checkpoint restores it exactly. The head is never quantized (a 4-bit head
could not be trained in full), and its random initialisation is drawn after seeding with the
run's seed, so every machine starts from the same head and eval.py's "base" is the run's own
step-0 model.

The batch stays padded whatever the causal-LM layout: each sample is pooled on its own row, so
rows are right-padded to the micro-batch's longest sample with an attention mask. The loss of a
micro-batch is the summed cross-entropy of its samples over the optimizer step's sample count,
so, as for a causal LM, the gradient does not depend on how the step is split.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from baton.state_schema import RunSpec

from . import dist
from .classify_data import Labelled
from .order import shard

HEAD_NAMES = ("score", "classifier")  # decoders' and encoders' heads in transformers


def is_classifier(spec: RunSpec) -> bool:
    return spec.task == "classification"


def head_kwargs(spec: RunSpec, pad_token_id: Optional[int]) -> dict:
    """from_pretrained's arguments for the run's head: its size and the label names, so a
    merged model's config says what each output means."""
    labels = list(spec.labels)
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "pad_token_id": pad_token_id}


def auto_class(spec: RunSpec):
    """The transformers Auto class the run's base model loads with."""
    import transformers

    name = ("AutoModelForSequenceClassification" if is_classifier(spec)
            else "AutoModelForCausalLM")
    return getattr(transformers, name)


def keep_head_unquantized(quant) -> None:
    """bitsandbytes must leave the head a plain Linear: PEFT trains a full copy of it."""
    if quant is not None:
        skip = list(getattr(quant, "llm_int8_skip_modules", None) or [])
        quant.llm_int8_skip_modules = skip + [n for n in HEAD_NAMES if n not in skip]


def collate(samples: list[Labelled], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with their attention mask, and one label a row."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, :len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[row, :len(s.input_ids)] = 1
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits_of(model, chunk: list[Labelled], pad_id: int, device: torch.device,
              autocast: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits [rows, classes], labels [rows]) of one micro-batch. The model gets no
    labels: the loss is ours, normalised over the whole step."""
    batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
    labels = batch.pop("labels")
    with autocast():
        out = model(**batch)
    return out.logits.float(), labels


def forward(model, chunk: list[Labelled], label_total: torch.Tensor, pad_id: int,
            device: torch.device, autocast: Callable) -> tuple[torch.Tensor, int]:
    """(loss, tokens) of a training micro-batch, as the engine's causal-LM forward returns."""
    logits, labels = logits_of(model, chunk, pad_id, device, autocast)
    loss = F.cross_entropy(logits, labels, reduction="sum") / label_total
    return loss, sum(len(s.input_ids) for s in chunk)


def predict(trainer, samples: list[Labelled]) -> torch.Tensor:
    """fp32 logits [len(samples), classes] of the trainer's model, in eval mode, no gradient."""
    rows = []
    trainer.model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), trainer.micro_batch_size):
            logits, _ = logits_of(trainer.model, samples[start: start + trainer.micro_batch_size],
                                  trainer.tokenizer.pad_token_id, trainer.device,
                                  trainer._autocast)
            rows.append(logits.cpu())
    trainer.model.train()
    return torch.cat(rows) if rows else torch.zeros((0, len(trainer.spec.labels)))


def evaluate(trainer) -> Optional[float]:
    """Mean cross-entropy over the eval split (every rank its share, summed), and the
    accuracy into the cursor beside it; None without an eval split."""
    samples = trainer.data.eval_samples()
    if not samples:
        return None
    mine = shard(samples, trainer.rank, trainer.world)
    loss_sum, correct = 0.0, 0
    if mine:
        logits = predict(trainer, mine)
        labels = torch.tensor([s.label for s in mine])
        loss_sum = float(F.cross_entropy(logits, labels, reduction="sum"))
        correct = int((logits.argmax(-1) == labels).sum())
    n = len(samples)
    trainer.cursor.eval_loss = dist.sum_scalar(loss_sum, trainer.device) / n
    trainer.cursor.eval_accuracy = dist.sum_scalar(float(correct), trainer.device) / n
    return trainer.cursor.eval_loss
