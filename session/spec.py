"""The run's spec: created once by the first session, matched by every later one.

The spec pins what must not change within a run (model revision, LoRA, training settings, the
data by content), so a later session with a different config is refused before it writes
anything. The data files themselves travel through the store (a Hub dataset through its pinned
commit: session/hub_source.py), so a fresh machine can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from baton.handoff import ConflictError
from baton.handoff.runstore import RunStore
from baton.state_schema import RunConfig, RunSpec
from baton.state_schema.fields import task_of

from baton.training.data import DataError  # stdlib only: light enough for the CLI's first second


class SpecError(ValueError):
    """The config does not match the stored run, or its data or model cannot be used."""


def prepare_spec(runstore: RunStore, config: RunConfig) -> RunSpec:
    """The run's spec: the stored one after checking the config against it, or a new one
    (data uploaded first, then the spec created if still absent)."""
    stored = runstore.read_spec()
    if stored is None:
        spec = new_spec(runstore, config)
        try:
            runstore.create_spec(spec)
            return spec
        except ConflictError:  # another agent created the run at the same moment
            stored = runstore.read_spec()
    differences = spec_differences(stored, config)
    if differences:
        raise SpecError(
            f"the config does not match run {config.run!r} in {config.store}:\n  "
            + "\n  ".join(differences)
            + "\nPut the run's values back in the config, or pick a new run name to start "
            "a new run with these.")
    return stored


def new_spec(runstore: RunStore, config: RunConfig) -> RunSpec:
    data = config.data
    fields = inspect_hub_data(config) if data.hub is not None else inspect_data(config)
    labels = classification_labels(config, fields.pop("train_records"), fields)
    revision = pinned_revision(config)
    if fields["key"] is None:  # local data: uploaded once, so a fresh machine needs nothing
        fields["key"] = upload(runstore, Path(data.train), fields["sha256"])
    held = eval_file(config)
    eval_key = upload(runstore, held, fields["eval_sha256"]) if held is not None else None
    return spec_of(config, revision, fields, eval_key, labels)


def spec_of(config: RunConfig, revision: str, fields: dict[str, Any],
            eval_key: Optional[str] = None, labels: Optional[list[str]] = None) -> RunSpec:
    """The spec of `config` once its data is inspected (`inspect_data`, `inspect_hub_data`)
    and `fields["key"]` names where it is stored (scripts/bench.py builds a run's spec with
    it, storing nothing)."""
    data, t = config.data, config.train
    return RunSpec(
        run=config.run, model=config.model.model_copy(update={"revision": revision}),
        lora=config.lora, keep=config.checkpoint.keep, optimizer_state=config.checkpoint.optimizer,
        eval_records=config.eval.max_records,
        data={"source": data.train, "eval": data.eval, "eval_key": eval_key,
              "max_seq_len": data.max_seq_len, "packing": data.packing, **fields},
        train=t.model_dump(exclude={"micro_batch_size", "precision", "sharding"}),
        task=config.task, labels=labels or [])


def inspect_data(config: RunConfig) -> dict[str, Any]:
    """The spec's data fields of a local file (train sha256, format, column mapping, eval
    sha256), read before anything is uploaded, so that bad data or a bad mapping is refused
    with nothing written."""
    from baton.training.columns import load_records, resolve_columns
    from baton.training.data import fingerprint, read_records

    data, task = config.data, task_of(config)
    train = Path(data.train)
    try:
        sha = fingerprint(train)
        fmt, columns = resolve_columns(read_records(train)[0], data.columns, data.format, task,
                                       source=train)
        records = load_records(train, columns, fmt, task)  # every record maps, not only the first
        eval_sha = check_eval_file(config, fmt, columns)
    except DataError as exc:
        raise SpecError(str(exc)) from None
    return {"key": None, "sha256": sha, "format": fmt, "columns": columns,
            "eval_sha256": eval_sha, "train_records": records}


def inspect_hub_data(config: RunConfig) -> dict[str, Any]:
    """The spec's data fields of a Hub dataset, pinned to a commit (session/hub_source.py).
    A Hub that does not answer (DatasetUnavailableError) passes up: exit 1, run again."""
    from .hub_source import hub_data_fields, inspect_hub

    try:
        found = inspect_hub(config)
        fields = hub_data_fields(found)
        fields["eval_sha256"] = fields["eval_sha256"] or check_eval_file(
            config, found.format, found.columns)
        fields["train_records"] = found.records  # the label set of a classification run
    except DataError as exc:
        raise SpecError(str(exc)) from None
    return fields


def eval_file(config: RunConfig) -> Optional[Path]:
    """data.eval as a local file (uploaded to the store), or None (a fraction, or a split of
    the Hub dataset)."""
    from .hub_source import eval_split

    if not isinstance(config.data.eval, str):
        return None
    if config.data.hub is not None and eval_split(config) is not None:
        return None
    return Path(config.data.eval)


def check_eval_file(config: RunConfig, fmt: str, columns: dict[str, str]) -> Optional[str]:
    """The eval file's sha256, once every record of it maps as the training data does."""
    from baton.training.columns import load_records
    from baton.training.data import fingerprint

    held = eval_file(config)
    if held is None:
        return None
    load_records(held, columns, fmt, task_of(config))
    return fingerprint(held)


def classification_labels(config: RunConfig, records: list[dict[str, Any]],
                          fields: dict[str, Any]) -> list[str]:
    """A classification run's label set, sorted, from its training split's records (mapped
    through data.columns; training/classify_data.py); [] for a causal LM. A local eval file is
    checked here too, so bad labels are refused before anything is written; a Hub eval split's
    labels are checked by the session before the model loads."""
    if task_of(config) != "classification":
        return []
    from baton.training.classify_data import run_labels
    from baton.training.columns import load_records

    data = config.data
    if data.format not in ("auto", "text"):
        raise SpecError(f"task: classification reads text and label fields; data.format "
                        f"{data.format!r} does not apply: leave it at auto")
    try:
        held = eval_file(config)
        held_records = (load_records(held, fields["columns"], fields["format"], "classification")
                        if held is not None else None)
        fraction = data.eval if isinstance(data.eval, float) else None
        return run_labels(records, fraction, config.train.seed, held_records,
                          source=data.train, eval_source=str(data.eval))
    except DataError as exc:
        raise SpecError(str(exc)) from None


def upload(runstore: RunStore, path: Path, sha256: str) -> str:
    return runstore.upload_data(path, sha256, path.suffix.lstrip(".") or "jsonl")


def pinned_revision(config: RunConfig) -> str:
    """The model revision as a commit (or a local folder's fingerprint), so that every session
    trains the same weights even when the branch moves."""
    from baton.training.model import ModelLoadError, resolve_revision

    # A Hub that does not answer (ModelUnavailableError) is not the config's fault: it passes
    # up to the session, which exits 1, "run again".
    try:
        return resolve_revision(config.model.name, config.model.revision)
    except ModelLoadError as exc:
        raise SpecError(f"model {config.model.name!r} at revision {config.model.revision!r} "
                        f"cannot be resolved: {exc}") from None


def spec_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """Each field the config sets differently from the run, as 'key: run has X, config Y'."""
    pairs = [("task", spec.task, config.task),
             ("model.load_in_4bit", spec.model.load_in_4bit, config.model.load_in_4bit),
             ("data.max_seq_len", spec.data.max_seq_len, config.data.max_seq_len),
             ("data.packing", spec.data.packing, config.data.packing),
             ("checkpoint.keep", spec.keep, config.checkpoint.keep),
             ("checkpoint.optimizer", spec.optimizer_state, config.checkpoint.optimizer)]
    pairs += [(f"lora.{k}", v, getattr(config.lora, k)) for k, v in spec.lora]
    pairs += [(f"train.{k}", v, getattr(config.train, k)) for k, v in spec.train]
    if "eval_records" in spec.model_fields_set:  # a spec from before the key: not compared
        pairs.append(("eval.max_records", spec.eval_records, config.eval.max_records))
    if config.data.format != "auto":
        pairs.append(("data.format", spec.data.format, config.data.format))
    if config.data.columns:  # none given: the run's own (perhaps recognised) mapping stands
        pairs.append(("data.columns", spec.data.columns, config.data.columns))
    if not same_model(spec, config):
        pairs.append(("model.name", spec.model.name, config.model.name))
    differences = [f"{key}: the run has {run!r}, the config says {cfg!r}"
                   for key, run, cfg in pairs if run != cfg]
    return differences + data_differences(spec, config)


def same_model(spec: RunSpec, config: RunConfig) -> bool:
    if spec.model.name == config.model.name:
        return True
    # The same local folder reached by another path (another machine, a relative path).
    return spec.model.revision.startswith("local:") and Path(config.model.name).is_dir() \
        and pinned_revision(config) == spec.model.revision


def data_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """The data files are compared by content where this machine has them; a fresh machine
    without them trains on the store's copy."""
    from baton.training.data import fingerprint

    from .hub_source import hub_differences

    found = hub_differences(spec, config)
    train = Path(config.data.train)
    if spec.data.hub is None and train.is_file() and fingerprint(train) != spec.data.sha256:
        found.append(f"data.train: {train} has other bytes (sha256 {fingerprint(train)[:12]}…) "
                     f"than the run's data ({spec.data.sha256[:12]}…, kept in the store at "
                     f"{spec.data.key})")
    ours, theirs = config.data.eval, spec.data.eval
    if isinstance(ours, str) != isinstance(theirs, str) or (
            not isinstance(ours, str) and ours != theirs):
        found.append(f"data.eval: the run has {theirs!r}, the config says {ours!r}")
    elif isinstance(ours, str) and Path(ours).is_file() \
            and fingerprint(Path(ours)) != spec.data.eval_sha256:
        found.append(f"data.eval: {ours} has other bytes than the run's eval data")
    return found


def local_inputs(runstore: RunStore, spec: RunSpec, config: Optional[RunConfig],
                 workdir: Path) -> tuple[Path, Optional[Path]]:
    """Local paths of the training and eval data: the config's files when they are the run's,
    else the store's copies (or the Hub dataset's files at the run's commit); every file is
    checked against the spec's sha256. With no config (eval.py) the copies are always read."""
    data = spec.data
    nowhere = Path("-")  # not a local file
    if data.hub is not None:
        from .hub_source import hub_inputs

        train, evaluation = hub_inputs(data, workdir)
    else:
        given = Path(config.data.train) if config is not None else nowhere
        train, evaluation = fetch_data(runstore, data.key, data.sha256, given, workdir), None
    if data.eval_key and data.eval_sha256:
        held = config.data.eval if config is not None else None
        given = Path(held) if isinstance(held, str) else nowhere
        evaluation = fetch_data(runstore, data.eval_key, data.eval_sha256, given, workdir)
    return train, evaluation


def fetch_data(runstore: RunStore, key: str, sha256: str, given: Path, workdir: Path) -> Path:
    from baton.training.data import check_fingerprint, fingerprint

    if given.is_file() and fingerprint(given) == sha256:
        return given
    cached = workdir / "data" / key.rsplit("/", 1)[-1]
    if cached.is_file() and fingerprint(cached) == sha256:
        return cached
    runstore.store.download(key, cached)
    check_fingerprint(cached, sha256, what="data downloaded from the store")
    return cached
