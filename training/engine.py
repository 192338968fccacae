"""The trainer: one optimizer step at a time, and an exact resume from adapter + cursor.

An optimizer step consumes `batch_size` samples, always the same ones for the same step:
their order comes from (seed, epoch) and the cursor's position, whatever the micro-batch size
or number of ranks. The loss of a micro-batch is its summed token loss divided by the number
of loss tokens in the whole optimizer step (all micro-batches, all ranks), so the gradient does
not depend on how the step is split.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from baton.state_schema import Cursor, RunSpec

from . import classify, dist, rng, sharding
from .classify_data import LabelledData
from .dataset import RunData
from .devices import DeviceInfo, detect_device
from .encode import Encoded
from .encoded import EncodedCache, SharedFile
from .layout import collator, needs_varlen_attention, uses_padding_free
from .model import load_model, trainable_parameters
from .optim import (OPTIMIZER_FILE, OptimizerStateError, load_optimizer, make_optimizer,
                    make_scheduler, save_optimizer)
from .order import shard, step_indices
from .order import total_steps as order_total_steps

log = logging.getLogger(__name__)

CURSOR_FILE = "cursor.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be resumed from."""


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    tokens: int
    seconds: float
    skipped: bool = False  # the fp16 loss scaler skipped it: samples consumed, no update


def total_steps(spec: RunSpec, n_train: int) -> int:
    """max_steps, or ceil(epochs * n_train / batch_size)."""
    return order_total_steps(spec.train.max_steps, spec.train.epochs, spec.train.batch_size,
                             n_train)


class Trainer:
    def __init__(self, spec: RunSpec, *, data_path: Path, eval_path: Optional[Path] = None,
                 micro_batch_size: int, device: Optional[str] = None,
                 precision: str = "auto", padding_free: bool = True,
                 kernels: Optional[str] = None, phase: Optional[Callable[[str], Any]] = None,
                 data_cache: Optional[EncodedCache] = None, sharding_mode: str = "ddp"):
        """`phase(name)`, a context manager, times the parts of building the trainer ("data",
        "model_load") for the session's timings (session/timings.py); none by default.
        `data_cache` keeps the encoded data between sessions (training/encoded.py).
        `sharding_mode`: ddp, or fsdp to shard the NF4 base over the ranks (sharding.py)."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        phase = phase or (lambda _name: contextlib.nullcontext())
        self.spec = spec
        self.micro_batch_size = micro_batch_size
        self.rank, self.world = dist.rank_and_world()
        self.device_info: DeviceInfo = detect_device(device, precision)
        if kernels:  # a path chosen by the session (its start-up probe), else by the device
            self.device_info.kernels = kernels
        # The data is checked before the model loads: a wrong file fails in a second, not minutes.
        self.classifier = classify.is_classifier(spec)  # padded, pooled: training/classify.py
        with phase("data"):
            if self.classifier:  # labels, not token streams: encoded per sample, uncached
                self.data = LabelledData(spec, Path(data_path),
                                         Path(eval_path) if eval_path else None)
            else:
                self.data = RunData(spec, Path(data_path),
                                    Path(eval_path) if eval_path else None, cache=data_cache)
        with phase("model_load"):
            self.model, self.tokenizer = load_model(spec, self.device_info)
        with phase("data"):
            self._attach_data()
        with phase("model_load"):
            self._patch_kernels()
            # A classifier pools one row per sample: its batches stay padded (classify.py).
            self._choose_layout(padding_free and not self.classifier)
            self.params = [p for _, p in trainable_parameters(self.model)]
            # More than one rank: DDP reduces the LoRA gradients (None on one rank). self.model
            # stays the PEFT model for eval, save and load; only the training forward uses DDP.
            # fsdp: a sharding.ShardedModel in the same slot (the base sharded, LoRA not).
            self.ddp = sharding.wrap(self.model, self.device, sharding_mode, self.classifier)
            self.optimizer = make_optimizer(spec, self.params, self.device_info.type)
        self.cursor = Cursor(total_steps=total_steps(spec, self.data.n_train))
        self.scheduler = make_scheduler(spec, self.optimizer, self.cursor.total_steps, 0)
        self.scaler = (torch.amp.GradScaler(self.device_info.type)
                       if self.device_info.uses_scaler else None)
        self.last_indices: list[int] = []  # the step's samples, all ranks, in data order
        self.last_rank_indices: list[int] = []  # this rank's share of them

    # -- setup -------------------------------------------------------------------------

    def _attach_data(self) -> None:
        """Encode (or load) the data. The ranks of one machine share rank 0's encoded file:
        rank 0 fetches or builds it, then tells the others where it is."""
        if self.world == 1:
            self.data.attach(self.tokenizer)
            return
        if self.rank == 0:
            self.data.attach(self.tokenizer)
        shared = dist.from_leader(self.data.encoded_file if self.rank == 0 else None)
        if self.rank != 0:
            cache = SharedFile(*shared, rank=self.rank) if isinstance(shared, tuple) else None
            self.data.attach(self.tokenizer, cache)

    def _patch_kernels(self) -> None:
        """Kernels by the device (BATON_KERNELS=none|reference|triton overrides the choice;
        `none` trains the plain Hugging Face and PEFT modules)."""
        from baton.kernels.patch import patch_model

        report = patch_model(self.model, self.device_info)
        self.device_info.kernels = report.path
        # The ops the family keeps unfused, and why, for the start line and the record.
        self.kernels_unfused = report.unfused_text() or None
        log.info("kernels: %s path, patched %s", report.path, ", ".join(report.patched))

    def _choose_layout(self, padding_free: bool) -> None:
        """Padding-free rows (the default) or padded ones, and the attention they need
        (training/layout.py, training/attention.py); a session may switch either way."""
        from .attention import current_attention
        from .eager_attention import use_per_sample_attention

        self.padding_free = uses_padding_free(padding_free)
        self.attention = current_attention(self.model)  # the model's own, for padded rows
        if needs_varlen_attention(self.padding_free, self.spec.data.packing):
            self.attention = use_per_sample_attention(self.model, self.device,
                                                      self.device_info.dtype)
        self._collate = collator(self.padding_free, self.tokenizer.pad_token_id)

    @property
    def finished(self) -> bool:
        return self.cursor.finished

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_info.device)

    def _autocast(self):
        # The CPU has its own autocast for fp16 and bf16: the GPU's precision paths run there.
        if self.device_info.precision != "fp32":
            return torch.autocast(self.device_info.type, dtype=self.device_info.dtype)
        return contextlib.nullcontext()

    # -- the step ----------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step over the next batch_size samples."""
        if self.finished:
            raise RuntimeError(f"the run is finished ({self.cursor.step} of "
                               f"{self.cursor.total_steps} steps); nothing left to train")
        if self.needs_base:  # the session measures it first (an eval of its own); else here
            self.measure_base()  # on every rank: evaluate() sums over them
        started = time.perf_counter()
        picks = step_indices(self.spec.train.seed, self.data.n_train, self.cursor.epoch,
                             self.cursor.epoch_position, self.spec.train.batch_size)
        self.last_indices = [index for index, _, _ in picks]
        self.last_rank_indices = shard(self.last_indices, self.rank, self.world)
        samples = [self.data.sample(i) for i in self.last_rank_indices]
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss, tokens = self._accumulate(samples)
        # The summed loss is the same number on every rank, so every rank skips together.
        applied = self._optimizer_step() if math.isfinite(loss) else self._skip_step()
        seconds = time.perf_counter() - started
        self._advance(picks, loss, tokens, seconds, applied)
        return StepResult(self.cursor.step, loss, lr, tokens, seconds, skipped=not applied)

    def _count_label_tokens(self, samples: list[Encoded]) -> float:
        return dist.sum_scalar(float(sum(s.label_tokens for s in samples)), self.device)

    def _forward(self, chunk: list[Encoded], label_total: torch.Tensor, module=None):
        if self.classifier:  # its own padded batch and per-sample loss, whatever the LM layout
            return classify.forward(self.model if module is None else module, chunk,
                                    label_total, self.tokenizer.pad_token_id, self.device,
                                    self._autocast)
        batch = {k: v.to(self.device) for k, v in self._collate(chunk).items()}
        with self._autocast():
            # HF's causal-LM loss with num_items_in_batch = sum of token losses / that count.
            model = self.model if module is None else module  # DDP's forward when training
            out = model(**batch, num_items_in_batch=label_total)
        # Tokens without padding (a packed batch has no attention_mask to count them from).
        return out.loss, sum(len(s.input_ids) for s in chunk)

    def _backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the global-token loss needs their sum.
        scaled = self.ddp is not None and not getattr(self.ddp, "sums_gradients", False)
        loss = loss * dist.loss_factor() if scaled else loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _accumulate(self, samples: list[Encoded]) -> tuple[float, int]:
        self.model.train()
        label_total = torch.tensor(max(self._count_label_tokens(samples), 1.0),
                                   device=self.device)
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        chunks = self._chunks(samples)
        fill = sharding.fillers(self.ddp, len(chunks))  # collectives every rank must join
        for i, chunk in enumerate(chunks + [None] * fill):
            # One all-reduce a step: every micro-batch but the last accumulates locally.
            with dist.sync_unless(self.ddp, last=i == len(chunks) + fill - 1):
                if chunk is None:
                    self._join_reduce(label_total)
                    continue
                loss, n = self._forward(chunk, label_total, self.ddp)
                self._backward(loss)
            loss_sum += loss.detach().float()
            tokens += n
        total_loss = dist.sum_scalar(float(loss_sum), self.device)
        return total_loss, int(dist.sum_scalar(float(tokens), self.device))

    def _chunks(self, samples: list) -> list[list]:
        m = self.micro_batch_size
        return [samples[start: start + m] for start in range(0, len(samples), m)]

    def _join_reduce(self, label_total: torch.Tensor) -> None:
        """A rank with no sample this step (batch_size below the rank count) still joins DDP's
        all-reduce, or the others would wait for it: one of the step's samples at weight zero.
        Sharded, a rank with fewer micro-batches joins the others' layer gathers the same way."""
        loss, _ = self._forward([self.data.sample(self.last_indices[0])], label_total, self.ddp)
        self._backward(loss * 0.0)

    def _optimizer_step(self) -> bool:
        """Clip, step, schedule; False when the loss scaler skipped the step (inf/NaN grads).

        A skipped step consumed its samples but changed no weight, so, as Accelerate does, the
        schedule does not move for it: the learning rate stays where the weights are."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.spec.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.train.max_grad_norm)
        applied = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # the scaler backs off only on a skip
        else:
            self.optimizer.step()
        if applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def _skip_step(self) -> bool:
        """A non-finite loss (the forward overflowed): no update, no schedule step, and the
        scaler keeps its scale (backing it off cannot repair a forward overflow). Without a
        scaler (bf16, fp32) this is what keeps NaN gradients out of the weights."""
        self.optimizer.zero_grad(set_to_none=True)
        return False

    def _advance(self, picks, loss: float, tokens: int, seconds: float, applied: bool) -> None:
        c = self.cursor
        _, c.epoch, c.epoch_position = picks[-1]
        if c.epoch_position >= self.data.n_train:
            c.epoch, c.epoch_position = c.epoch + 1, 0
        c.step += 1
        c.training_seconds += seconds
        if not applied:  # consumed (the data order moved on) but not trained
            c.skipped_steps += 1
            c.skipped_samples += len(picks)
            c.skipped_tokens += tokens
        else:
            c.samples_seen += len(picks)
            c.tokens_seen += tokens
        c.scheduler_step = c.step - c.skipped_steps
        if math.isfinite(loss):  # JSON has no inf/NaN: a non-finite loss is not logged
            c.loss = loss
            c.losses.append((c.step, loss))

    # -- eval --------------------------------------------------------------------------

    def evaluate(self) -> Optional[float]:
        """Mean token loss over the eval split, or None without one. Uses no randomness."""
        if self.classifier:  # the loss per sample, and the accuracy beside it in the cursor
            return classify.evaluate(self)
        samples = self.data.eval_samples()
        if not samples:
            return None
        mine = shard(samples, self.rank, self.world)
        label_total = torch.tensor(
            float(max(sum(s.label_tokens for s in samples), 1)), device=self.device)
        loss_sum = 0.0
        self.model.eval()
        with torch.no_grad():
            chunks = self._chunks(mine)
            fill = sharding.fillers(self.ddp, len(chunks), training=False)  # before any gather
            for chunk in chunks:
                loss, _ = self._forward(chunk, label_total)
                loss_sum += float(loss)
            for _ in range(fill):
                self._forward(samples[:1], label_total)  # joins the gathers; not counted
        self.model.train()
        self.cursor.eval_loss = dist.sum_scalar(loss_sum, self.device)
        return self.cursor.eval_loss

    @property
    def needs_base(self) -> bool:
        """True before the run's first step while the base model's eval loss is unmeasured."""
        return self.cursor.step == 0 and self.cursor.base_eval_loss is None

    def measure_base(self) -> Optional[float]:
        """The eval loss before the first optimizer step, kept in the cursor. LoRA's B starts
        at zero, so this is the base model's own loss in the run's configuration (4-bit as
        trained, same template and masking): the yardstick of every later eval loss."""
        previous = self.cursor.eval_loss, self.cursor.eval_accuracy
        self.cursor.base_eval_loss = self.evaluate()
        self.cursor.eval_loss, self.cursor.eval_accuracy = previous
        return self.cursor.base_eval_loss

    # -- save and load -----------------------------------------------------------------

    def save(self, out_dir: Path) -> None:
        """Adapter (PEFT format), cursor and, when the spec asks, optimizer state. Rank 0 only."""
        if self.rank != 0:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: not checkpoint data
        self.cursor.rng = rng.capture()
        if self.scaler:  # else keep the last fp16 session's state for the next fp16 session
            self.cursor.scaler = self.scaler.state_dict()
        (out_dir / CURSOR_FILE).write_bytes(self.cursor.to_json())
        if self.spec.optimizer_state:
            save_optimizer(self.optimizer, out_dir)

    def load(self, checkpoint_dir: Path) -> None:
        """Continue from a checkpoint folder written by save()."""
        checkpoint_dir = Path(checkpoint_dir)
        cursor = self._read_cursor(checkpoint_dir)
        self._load_adapter(checkpoint_dir)
        self._load_optimizer(checkpoint_dir / OPTIMIZER_FILE)
        self.cursor = cursor
        self.scheduler = make_scheduler(self.spec, self.optimizer, cursor.total_steps,
                                        cursor.scheduler_step)
        if self.scaler and cursor.scaler:
            self.scaler.load_state_dict(cursor.scaler)
        rng.restore(cursor.rng)

    def _load_optimizer(self, path: Path) -> None:
        if not self.spec.optimizer_state:
            return
        if not path.is_file():
            log.warning("%s is missing; AdamW restarts its moments", path)
            return
        try:
            load_optimizer(self.optimizer, path)
        except OptimizerStateError as exc:
            # A session on another kind of device (8-bit AdamW on CUDA, torch AdamW on the
            # CPU) cannot use the state; losing the moments beats refusing to train.
            log.warning("%s; AdamW restarts its moments", exc)

    def _read_cursor(self, checkpoint_dir: Path) -> Cursor:
        for name in (CURSOR_FILE,) + ADAPTER_FILES:
            if not (checkpoint_dir / name).is_file():
                raise CheckpointError(f"{checkpoint_dir} has no {name}; it is not a Baton "
                                      "checkpoint (or an incomplete one)")
        cursor = Cursor.from_json((checkpoint_dir / CURSOR_FILE).read_bytes(),
                                  source=str(checkpoint_dir / CURSOR_FILE))
        if cursor.total_steps != self.cursor.total_steps:
            raise CheckpointError(
                f"the checkpoint's run has {cursor.total_steps} steps but this data and spec give "
                f"{self.cursor.total_steps}; the data or spec differ from the run's")
        return cursor

    def _load_adapter(self, checkpoint_dir: Path) -> None:
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        weights = load_peft_weights(str(checkpoint_dir), device=self.device_info.device)
        try:
            result = set_peft_model_state_dict(self.model, weights)
        except KeyError as exc:  # PEFT's answer to a modules_to_save weight (a head) not there
            raise CheckpointError(f"{checkpoint_dir}'s adapter lacks the trained weight "
                                  f"{exc}; it was saved by another kind of run") from None
        # A trained classification head rides in modules_to_save: it must come back too.
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing:
            raise CheckpointError(f"{checkpoint_dir}'s adapter lacks {len(missing)} trained "
                                  f"weights (e.g. {missing[0]}); it was trained with other lora "
                                  "settings")
