"""Documents that change as the run goes: cursor, HEAD, lease, manifest, session record."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from .timings import SessionTimings
from .versioning import Stored


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Cursor(Stored):
    """Everything needed to continue a run exactly where it stopped.

    The data order of epoch e is a permutation drawn from (seed, e), so `epoch` and
    `epoch_position` (samples of that epoch already consumed) locate the next sample in O(1).
    """

    step: int = 0  # optimizer steps done
    total_steps: int
    epoch: int = 0
    epoch_position: int = 0
    samples_seen: int = 0  # samples of the steps the optimizer applied: what was trained
    tokens_seen: int = 0  # their tokens
    rng: dict[str, str] = Field(default_factory=dict)  # name -> base64 of the RNG state
    scaler: Optional[dict[str, Any]] = None  # torch GradScaler.state_dict() under fp16
    scheduler_step: int = 0  # optimizer steps applied: step minus the steps the scaler skipped
    skipped_steps: int = 0  # steps that changed no weight (fp16 gradient overflow, or a
    # non-finite loss): their samples were consumed (epoch_position moved) but not trained
    skipped_samples: int = 0  # samples of those steps: consumed = samples_seen + this
    skipped_tokens: int = 0  # their tokens
    training_seconds: float = 0.0
    loss: Optional[float] = None  # last logged training loss
    eval_loss: Optional[float] = None
    eval_accuracy: Optional[float] = None  # classification runs: share of eval records right
    # The base model's eval loss, measured before the first optimizer step (the adapter is
    # still zero then): every later eval loss is read against it.
    base_eval_loss: Optional[float] = None
    losses: list[tuple[int, float]] = Field(default_factory=list)  # (step, loss), whole run

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


class Head(Stored):
    """HEAD.json: the committed checkpoint and the generation of the lease that wrote it."""

    checkpoint: Optional[str] = None  # e.g. "00000120-g3"; None before the first commit
    previous: Optional[str] = None  # the checkpoint before, kept for fallback on corruption
    step: int = 0
    generation: int = 0
    finished: bool = False
    updated_at: datetime = Field(default_factory=utcnow)


class Lease(Stored):
    holder: str  # a random id per agent process
    host: str
    gpu: str = "cpu"
    generation: int
    acquired_at: datetime = Field(default_factory=utcnow)
    renewed_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    released: bool = False

    def live(self, now: Optional[datetime] = None) -> bool:
        return not self.released and (now or utcnow()) < self.expires_at


class FileEntry(BaseModel):
    sha256: str
    size: int


class Manifest(Stored):
    """Written last into a checkpoint folder: its presence means every file is uploaded."""

    checkpoint: str
    step: int
    generation: int
    files: dict[str, FileEntry]
    created_at: datetime = Field(default_factory=utcnow)


class SessionRecord(Stored):
    session_id: str
    host: str
    gpu: str = "cpu"
    gpu_count: int = 0
    kernels: Literal["triton", "reference", "none"] = "none"
    # The start-up probe (session/probe.py): "passed 7 ops in 41.2 s", "failed: lora_mlp
    # killed by SIGABRT" (kernels is then "reference"), "skipped: ..."; None before it existed
    kernels_probe: Optional[str] = None
    precision: str = "fp32"
    # The attention path (training/attention.py): "flash_varlen" or "sdpa_spans" per sample,
    # or the model's own (e.g. "sdpa") over padded rows; records before it were padded sdpa.
    attention: str = "sdpa"
    # Ops this model's family keeps unfused on the session's kernel path, with why
    # (kernels/patch.py's KernelReport.unfused): "rope (glm4 rotates interleaved pairs)"
    kernels_unfused: Optional[str] = None
    padding_free: bool = False  # the micro-batch layout of this session
    started: datetime = Field(default_factory=utcnow)
    ended: Optional[datetime] = None
    start_step: int = 0
    end_step: int = 0
    tokens: int = 0  # every step's, skipped or not: the numerator of tokens_per_s
    train_seconds: float = 0.0
    slowest_step_s: float = 0.0
    save_seconds: list[float] = Field(default_factory=list)
    upload_seconds: list[float] = Field(default_factory=list)
    exit_code: Optional[int] = None
    skipped_steps: int = 0  # steps of this session that changed no weight (see Cursor)
    nonfinite_steps: int = 0  # of those, steps whose loss was inf/NaN (a forward overflow)
    losses: list[tuple[int, float]] = Field(default_factory=list)
    eval_losses: list[tuple[int, float]] = Field(default_factory=list)
    base_eval_loss: Optional[float] = None  # measured by the session that took step 0
    eval_seconds: list[float] = Field(default_factory=list)  # each eval of this session
    timings: Optional[SessionTimings] = None  # where the wall-clock went (state_schema/timings)

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step

    @property
    def goodput(self) -> Optional[float]:
        return self.timings.goodput if self.timings is not None else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0
