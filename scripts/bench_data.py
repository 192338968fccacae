"""What the bench trains on: random tokens for a preset, or a run's own data for `--data`.

With `--model DIR --data FILE` the bench builds the spec a run of that model and file would
have (`session.spec.spec_of`: the format detected, the model's revision pinned, the run's
defaults for LoRA, optimizer and schedule), with nothing held out for evaluation and one
micro-batch per optimizer step, and reads the samples with the engine's own reader and
encoder (`training.dataset.RunData`: the chat template, the loss masking, truncation at
`--seq-len`). Baton's side then trains through `training.engine.Trainer` (the run's sample
order, its batching, its optimizer); HF's side gets the same samples in the same order
(`step_samples`) and pads each micro-batch to its longest sample, as TRL's SFTTrainer does by
default (`pad_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch



class BenchInputError(ValueError):
    """`--model`/`--data` name something the bench cannot use; the message says how to fix it."""


def run_spec(model_dir: Path, data_file: Path, *, seq_len: int, micro: int, steps: int,
             seed: int):
    """The RunSpec of a run on this model and data: the defaults a user's run.yaml gets."""
    from pydantic import ValidationError

    from baton.session.spec import SpecError, inspect_data, spec_of
    from baton.state_schema import RunConfig
    from baton.training.model import ModelLoadError, resolve_revision

    if not Path(model_dir).is_dir():
        raise BenchInputError(f"--model {model_dir} is not a folder; give a model folder "
                              "written by save_pretrained (config.json, weights, tokenizer)")
    try:
        config = RunConfig(
            run="bench", store=str(data_file.parent), model={"name": str(model_dir)},
            data={"train": str(data_file), "eval": None, "max_seq_len": seq_len},
            train={"batch_size": micro, "micro_batch_size": micro, "max_steps": steps,
                   "seed": seed})
        inspected = inspect_data(config)
        revision = resolve_revision(str(model_dir), "main")
    except (ValidationError, SpecError, ModelLoadError) as exc:
        raise BenchInputError(f"cannot bench {data_file} on {model_dir}: {exc}") from None
    inspected.pop("train_records", None)  # the label set of a classification run only
    inspected["key"] = f"bench/data/{inspected['sha256']}"
    return spec_of(config, revision, inspected)


def step_samples(spec, n_train: int, steps: int) -> Iterator[list[int]]:
    """The sample indices of each optimizer step, in the run's order (`training.order`),
    advanced as the engine's cursor advances."""
    from baton.training.order import step_indices

    epoch, position = 0, 0
    for _ in range(steps):
        picks = step_indices(spec.train.seed, n_train, epoch, position, spec.train.batch_size)
        yield [index for index, _, _ in picks]
        _, epoch, position = picks[-1]
        if position >= n_train:
            epoch, position = epoch + 1, 0


def pad_batch(samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest sample, with a 2D attention mask and -100 labels
    on the padding: TRL's SFTTrainer default (its collator pads per batch), which is exactly
    the engine's padded collate (`training.encode.collate` of unpacked samples)."""
    from baton.training.encode import collate

    return collate(samples, pad_id)


@dataclass
class RandomTokens:
    """A preset's workload: `batch` rows of `seq` uniform random tokens a step, seeded."""

    vocab: int
    batch: int
    seq: int
    seed: int

    def batches(self, steps: int, device) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(steps):
            yield torch.randint(0, self.vocab, (self.batch, self.seq), generator=gen).to(device)
