"""The run's config (run.yaml) and the spec stored with the run.

The config is what a person writes; the spec is the config less what may change between
sessions (store, micro-batch size, session limits, checkpoint interval) plus what pins the run
(data fingerprint, model revision). Validation lives here so a bad config is refused before any
heavy work starts.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .fields import check_column_keys, parse_hub_dataset, task_of
from .versioning import Stored

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")
STEPS = re.compile(r"^\s*(\d+)\s*steps?\s*$")


def parse_duration(value: Union[str, int, float, None]) -> Optional[float]:
    """'90s', '30m', '12h' or a number of seconds -> seconds. None stays None."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    match = DURATION.match(value)
    if not match:
        raise ValueError(f"duration {value!r} should be a number with s, m or h, e.g. '30m'")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"s": 1, "m": 60, "h": 3600}[unit]


def check_run_name(name: str) -> str:
    if not RUN_NAME.match(name) or ".." in name:
        raise ValueError(
            f"run name {name!r} may hold only letters, digits, '-', '_' and '.', "
            "start with a letter or digit, and contain no '..'"
        )
    return name


class Strict(BaseModel):
    """Config sections: an unknown or misspelled key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str
    revision: str = "main"
    load_in_4bit: bool = True


class LoraConfig(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class DataConfig(Strict):
    train: str  # a JSONL, CSV or Parquet file, or hf://datasets/OWNER/NAME[@REVISION]
    format: Literal["text", "pairs", "chat", "auto"] = "auto"
    eval: Union[float, str, None] = 0.05  # a fraction, a file, or a split of a Hub dataset
    max_seq_len: int = Field(2048, ge=8)
    packing: bool = False
    # A micro-batch's samples end to end in one row, no padding (training/layout.py). It
    # changes the computation, not the run: not part of the spec; may change per session.
    padding_free: bool = True
    subset: Optional[str] = None  # a Hub dataset's subset (its config name)
    split: str = "train"  # a Hub dataset's split
    # run field -> the file's column, or a template of columns: {prompt: "{q}\n\n{ctx}"}
    columns: dict[str, str] = {}

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, v):
        if isinstance(v, float) and not 0 <= v < 1:
            raise ValueError("data.eval as a fraction must be in [0, 1), e.g. 0.05")
        return v

    @model_validator(mode="after")
    def _hub_source(self):
        hub = parse_hub_dataset(self.train)
        if hub is None and (self.subset is not None or self.split != "train"):
            raise ValueError("data.subset and data.split choose from a Hub dataset; give "
                             "data.train as hf://datasets/OWNER/NAME, or drop them")
        if isinstance(self.eval, str) and self.eval.startswith("hf://"):
            raise ValueError("data.eval may name a split of data.train's Hub dataset (e.g. "
                             "'test'), a local file or a fraction, not another hf:// dataset")
        return self

    @property
    def hub(self) -> Optional[tuple[str, Optional[str]]]:
        """(repo id, revision or None) when data.train is a Hub dataset."""
        return parse_hub_dataset(self.train)


class TrainConfig(Strict):
    epochs: Optional[float] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    micro_batch_size: int = Field(2, ge=1)
    lr: float = Field(2.0e-4, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup: float = Field(0.03, ge=0)
    optimizer: Literal["adamw_8bit", "adamw"] = "adamw_8bit"
    max_grad_norm: Optional[float] = Field(0.3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 3407
    # auto: bf16 on sm_80+, fp16 with a loss scaler on sm_6x/7x, fp32 on the CPU. Like the
    # micro-batch, it may change between sessions (a T4 session, then an A100 one): it is
    # not part of the spec.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # More than one GPU: ddp holds the whole NF4 base on each, fsdp shards it over them
    # (training/sharding.py); auto takes ddp when plan's estimate fits one GPU. Not part of
    # the spec either: a sharded session may follow a DDP or single-GPU one, and the reverse.
    sharding: Literal["auto", "ddp", "fsdp"] = "auto"

    @model_validator(mode="after")
    def _length(self):
        if self.epochs is None and self.max_steps is None:
            self.epochs = 3
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class CheckpointConfig(Strict):
    every: Union[str, float] = "30m"
    keep: int = Field(3, ge=2)
    optimizer: bool = False

    @field_validator("every")
    @classmethod
    def _every(cls, v):
        parse_duration(v)
        return v


def parse_eval_every(value: Union[str, float]) -> tuple[str, Optional[float]]:
    """eval.every -> ("auto", None) | ("off", None) | ("steps", n) | ("seconds", s).

    'auto' spaces evals so that they take at most a fixed share of the session (their
    measured cost decides, session/evals.py); '200 steps' counts optimizer steps; a duration
    ('30m', or a number of seconds, as checkpoint.every) counts the session's seconds."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
        return value.strip().lower(), None
    match = STEPS.match(value) if isinstance(value, str) else None
    if match:
        if int(match.group(1)) < 1:
            raise ValueError("eval.every in steps must be at least 1, e.g. '200 steps'")
        return "steps", float(match.group(1))
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"eval.every {value!r} should be 'auto', 'off', a number of steps "
                         "('200 steps') or a duration ('30m')") from None
    if not seconds or seconds <= 0:
        raise ValueError("eval.every as a duration must be positive, e.g. '30m'")
    return "seconds", seconds


class EvalConfig(Strict):
    """When the held-out loss is measured, and on how many records (never inside a commit)."""

    every: Union[str, float] = "auto"
    # A fixed subset of the held-out records, drawn from train.seed, so every eval of the run
    # measures the same records and the losses stay comparable. null: all of them.
    max_records: Optional[int] = Field(200, ge=1)

    @field_validator("every")
    @classmethod
    def _every(cls, v):
        parse_eval_every(v)
        return v


class SessionConfig(Strict):
    limit: Union[str, float, None] = None
    start: Optional[str] = None

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        parse_duration(v)
        return v


class RunConfig(Strict):
    """run.yaml, after command-line overrides."""

    run: str
    store: str
    # causal_lm: next-token loss on the record's text; classification: a sequence-
    # classification head trained on (text[, text_pair]) -> label (training/classify.py).
    task: Literal["causal_lm", "classification"] = "causal_lm"
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    session: SessionConfig = SessionConfig()
    # apprise URLs told when a session pauses, finishes or fails. They hold tokens: they are
    # never part of the spec, the store or status (session/notify.py).
    notify: list[str] = []

    @field_validator("run")
    @classmethod
    def _run(cls, v):
        return check_run_name(v)

    @model_validator(mode="after")
    def _task(self):
        if self.task == "classification" and self.data.packing:
            raise ValueError("data.packing cannot be used with task: classification (each "
                             "sample is pooled on its own last token); set data.packing: false")
        return self

    @model_validator(mode="after")
    def _sharding(self):
        # fsdp shards the 4-bit base of a causal LM (training/sharding.py): refused before
        # anything is written, rather than after the model has loaded
        if self.train.sharding == "fsdp" and not self.model.load_in_4bit:
            raise ValueError("train.sharding fsdp shards the 4-bit base: set model.load_in_4bit "
                             "true, or train.sharding ddp (or auto)")
        if self.train.sharding == "fsdp" and self.task == "classification":
            raise ValueError("train.sharding fsdp trains causal LMs: set train.sharding ddp (or "
                             "auto) for task: classification")
        return self

    @model_validator(mode="after")
    def _columns(self):
        check_column_keys(self.data.columns, self.data.format, task_of(self))
        return self


class HubDataSpec(Strict):
    """A Hub dataset as pinned when the run was created: the commit and the files read."""

    repo: str
    revision: str  # the commit sha the files are read at
    ref: str = "main"  # the branch that held them: a revision, or refs/convert/parquet
    subset: Optional[str] = None
    split: str = "train"
    files: list[str]  # repo paths of the split's files, in reading order
    eval_split: Optional[str] = None
    eval_files: list[str] = []


class DataSpec(Strict):
    """The data as pinned in the spec: where it lives in the store and its fingerprint."""

    source: str  # the path the person gave, for messages only
    key: str  # <run>/data/<sha256>.<ext> in the store
    sha256: str
    format: Literal["text", "pairs", "chat"]
    eval: Union[float, str, None]
    eval_key: Optional[str] = None
    eval_sha256: Optional[str] = None
    max_seq_len: int
    packing: bool
    # run field -> column or template, as resolved when the run was created (format auto
    # fills in the alpaca and ShareGPT mappings); {} reads the run's fields by their names.
    columns: dict[str, str] = {}
    hub: Optional[HubDataSpec] = None  # set when the data is read from a Hub dataset


class TrainSpec(Strict):
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    batch_size: int
    lr: float
    schedule: Literal["linear", "cosine", "constant"]
    warmup: float
    optimizer: Literal["adamw_8bit", "adamw"]
    max_grad_norm: Optional[float]
    weight_decay: float
    seed: int


class RunSpec(Stored):
    """Written once when the run is created; every later session must match it."""

    model_config = ConfigDict(extra="ignore")
    run: str
    model: ModelConfig
    lora: LoraConfig
    data: DataSpec
    train: TrainSpec
    task: Literal["causal_lm", "classification"] = "causal_lm"
    # classification: the training split's labels, sorted; a label's id is its index here.
    labels: list[str] = []
    keep: int = 3
    optimizer_state: bool = False
    # eval.max_records when the run was created; a spec written before the key existed has
    # none (every held-out record), and then the config's value is not compared.
    eval_records: Optional[int] = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
