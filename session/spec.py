"""The run's spec: created once by the first session, matched by every later one.

The spec pins what must not change within a run (model revision, LoRA, training settings, the
data by content), so a later session with a different config is refused before it writes
anything. The data files themselves travel through the store, so a fresh machine can resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from handoff import ConflictError
from handoff.runstore import RunStore
from state_schema import RunConfig, RunSpec

from training.data import DataError  # stdlib only: light enough for the CLI's first second


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
    sha, fmt, eval_sha = inspect_data(config)
    revision = pinned_revision(config)
    key = upload(runstore, Path(data.train), sha)
    eval_key = upload(runstore, Path(data.eval), eval_sha) if eval_sha is not None else None
    t = config.train
    return RunSpec(
        run=config.run, model=config.model.model_copy(update={"revision": revision}),
        lora=config.lora, keep=config.checkpoint.keep, optimizer_state=config.checkpoint.optimizer,
        eval_records=config.eval.max_records,
        data={"source": data.train, "key": key, "sha256": sha, "format": fmt, "eval": data.eval,
              "eval_key": eval_key, "eval_sha256": eval_sha, "max_seq_len": data.max_seq_len,
              "packing": data.packing},
        train=t.model_dump(exclude={"micro_batch_size", "precision"}))


def inspect_data(config: RunConfig) -> tuple[str, str, Optional[str]]:
    """(train sha256, format, eval sha256 or None), read before anything is uploaded, so
    that bad data is refused with nothing written."""
    from training.data import check_format, detect_format, fingerprint, read_records

    data = config.data
    train = Path(data.train)
    try:
        sha = fingerprint(train)
        fmt = detect_format(train) if data.format == "auto" else data.format
        check_format(read_records(train), fmt, source=train)
        eval_sha = fingerprint(Path(data.eval)) if isinstance(data.eval, str) else None
    except DataError as exc:
        raise SpecError(str(exc)) from None
    return sha, fmt, eval_sha


def upload(runstore: RunStore, path: Path, sha256: str) -> str:
    return runstore.upload_data(path, sha256, path.suffix.lstrip(".") or "jsonl")


def pinned_revision(config: RunConfig) -> str:
    """The model revision as a commit (or a local folder's fingerprint), so that every session
    trains the same weights even when the branch moves."""
    from training.model import ModelLoadError, resolve_revision

    # A Hub that does not answer (ModelUnavailableError) is not the config's fault: it passes
    # up to the session, which exits 1, "run again".
    try:
        return resolve_revision(config.model.name, config.model.revision)
    except ModelLoadError as exc:
        raise SpecError(f"model {config.model.name!r} at revision {config.model.revision!r} "
                        f"cannot be resolved: {exc}") from None


def spec_differences(spec: RunSpec, config: RunConfig) -> list[str]:
    """Each field the config sets differently from the run, as 'key: run has X, config Y'."""
    pairs = [("model.load_in_4bit", spec.model.load_in_4bit, config.model.load_in_4bit),
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
    from training.data import fingerprint

    found = []
    train = Path(config.data.train)
    if train.is_file() and fingerprint(train) != spec.data.sha256:
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


def local_inputs(runstore: RunStore, spec: RunSpec, config: RunConfig,
                 workdir: Path) -> tuple[Path, Optional[Path]]:
    """Local paths of the training and eval data, fetched from the store when this machine
    lacks them; every file is checked against the spec's sha256."""
    train = fetch_data(runstore, spec.data.key, spec.data.sha256, Path(config.data.train),
                       workdir)
    evaluation = None
    if spec.data.eval_key and spec.data.eval_sha256:
        given = Path(config.data.eval) if isinstance(config.data.eval, str) else Path("-")
        evaluation = fetch_data(runstore, spec.data.eval_key, spec.data.eval_sha256, given,
                                workdir)
    return train, evaluation


def fetch_data(runstore: RunStore, key: str, sha256: str, given: Path, workdir: Path) -> Path:
    from training.data import check_fingerprint, fingerprint

    if given.is_file() and fingerprint(given) == sha256:
        return given
    cached = workdir / "data" / key.rsplit("/", 1)[-1]
    if cached.is_file() and fingerprint(cached) == sha256:
        return cached
    runstore.store.download(key, cached)
    check_fingerprint(cached, sha256, what="data downloaded from the store")
    return cached
