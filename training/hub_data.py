"""Training data from a dataset repo on the Hub, read at one pinned commit.

`pin` runs once, when the run is created: it resolves the revision to a commit and chooses
the files of the subset and split, from the README's `configs:` (the Hub's own way of naming
a dataset's subsets and splits), else from the file names (train / validation / test, as the
Hub's viewer reads them), else from the Hub's auto-converted `refs/convert/parquet` branch
(`<subset>/<split>/NNNN.parquet`). Parquet, JSON lines, JSON arrays and CSV are read; a repo
that holds only a loading script is refused. `fetch` downloads exactly those files at exactly
that commit, with huggingface_hub (so HF_TOKEN, HF_ENDPOINT and the HF cache apply).

Errors are sorted as the model's revision pinning sorts them: what the config or the token
must fix (a dataset, revision, subset or split that is not there; private; gated) is a
DataError, exit 2; a Hub that does not answer is DatasetUnavailableError, exit 1.
"""

from __future__ import annotations

import fnmatch
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from .data import SUFFIXES, DataError

CONVERTED = "refs/convert/parquet"
SPLIT_WORDS = {"train": ("train", "training"),
               "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DatasetUnavailableError(RuntimeError):
    """The Hub did not answer while reading a dataset: nothing is wrong with the config, and
    the same command may work in a minute."""


class DatasetAccessError(DataError):
    """The dataset, its revision or a file cannot be read with this token."""


@dataclass
class Pinned:
    """A dataset's subset and splits as read at one commit."""

    repo: str
    revision: str  # the commit
    ref: str  # what the commit was found through: the revision asked for, or CONVERTED
    subset: Optional[str]
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> repo paths

    def files(self, split: str) -> list[str]:
        if split not in self.splits:
            where = f"subset {self.subset!r} of " if self.subset else ""
            raise DataError(
                f"split {split!r} is not in {where}dataset {self.repo!r} (commit "
                f"{self.revision[:12]}); the splits there are: {', '.join(sorted(self.splits))}. "
                "Set data.split (or data.eval) to one of them")
        return self.splits[split]


def pin(repo: str, revision: Optional[str], subset: Optional[str]) -> Pinned:
    """The commit `revision` (default: main) names, and the subset's splits there."""
    api = _api()
    asked = revision or "main"
    with hub_errors(repo, asked):
        commit = api.dataset_info(repo, revision=asked).sha
        files = _tree(api, repo, commit)
        if asked == CONVERTED:  # named outright: its own layout, one folder a subset
            return Pinned(repo, commit, asked, *_converted_splits(files, subset, repo))
        configs = _yaml_configs(api, repo, commit, files)
        found = _splits(files, configs, subset, repo)
        if found is not None:
            return Pinned(repo, commit, asked, found[0], found[1])
        converted = _converted_commit(api, repo)
        if converted is None:
            raise _no_data(repo, commit, files)
        chosen, splits = _converted_splits(_tree(api, repo, converted), subset, repo)
        return Pinned(repo, converted, CONVERTED, chosen, splits)


def fetch(repo: str, commit: str, paths: list[str], cache_dir: Optional[Path] = None, *,
          pinned: bool = False) -> list[Path]:
    """Local copies of `paths` at `commit` (the HF cache answers without the network once it
    holds them). A file or commit that is gone is a DataError that says so; for a run that
    `pinned` them earlier, that it is never trained on other data."""
    api = _api()
    try:
        with hub_errors(repo, commit):
            return [Path(api.hf_hub_download(repo, p, repo_type="dataset", revision=commit,
                                             cache_dir=cache_dir)) for p in paths]
    except DatasetAccessError as exc:
        if not pinned:
            raise
        raise DatasetAccessError(
            f"{exc}. The run reads dataset {repo!r} at commit {commit} and no other data: "
            "give HF_TOKEN access again or restore that commit, or start a new run (another "
            "run name) on the data as it is now") from None


def as_source(paths: list[Path], folder: Path) -> Path:
    """One path the readers take: the file itself, or a folder of links to the files named
    in reading order (training.data reads a folder's files in name order)."""
    if len(paths) == 1:
        return paths[0]
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, path in enumerate(paths):
        (folder / f"{i:05d}-{path.name}").symlink_to(path.resolve())
    return folder


# -- the Hub -----------------------------------------------------------------------------------

def _api():
    from huggingface_hub import HfApi

    # HF_ENDPOINT is read now, not at import, so a mirror set late is still honoured.
    return HfApi(endpoint=os.environ.get("HF_ENDPOINT"))


def _tree(api, repo: str, commit: str) -> list[str]:
    from huggingface_hub.hf_api import RepoFile

    return sorted(e.path for e in api.list_repo_tree(repo, recursive=True, revision=commit,
                                                     repo_type="dataset")
                  if isinstance(e, RepoFile))


def _yaml_configs(api, repo: str, commit: str, files: list[str]) -> list[dict[str, Any]]:
    """The README's `configs:` list (the Hub's declaration of subsets and their files)."""
    if "README.md" not in files:
        return []
    import yaml

    text = Path(api.hf_hub_download(repo, "README.md", repo_type="dataset",
                                    revision=commit)).read_text(encoding="utf-8")
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0]) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"dataset {repo!r}: the README's metadata is not valid YAML ({exc})"
                        ) from None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _converted_commit(api, repo: str) -> Optional[str]:
    refs = api.list_repo_refs(repo, repo_type="dataset")
    return next((r.target_commit for r in refs.converts if r.ref == CONVERTED), None)


@contextmanager
def hub_errors(repo: str, revision: str):
    """Sorts huggingface_hub's errors into DataError (fix the input) and
    DatasetUnavailableError (try again); any other error passes unchanged."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted by type below; the rest re-raised as is
        sorted_exc = _sort_error(repo, revision, exc)
        if sorted_exc is None:
            raise
        raise sorted_exc from None


def _sort_error(repo: str, revision: str, exc: BaseException) -> Optional[Exception]:
    from huggingface_hub import errors

    page = f"{os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}/datasets/{repo}"
    if isinstance(exc, errors.GatedRepoError):
        return DatasetAccessError(
            f"dataset {repo!r} is gated: accept its terms on {page} with your account, then "
            "set HF_TOKEN to a token of that account (it is read, never stored)")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DatasetAccessError(
            f"dataset {repo!r} is not on the Hub, or it is private and HF_TOKEN is missing or "
            "may not read it; check data.train, and set HF_TOKEN to a token with read access")
    if isinstance(exc, errors.RevisionNotFoundError):
        return DatasetAccessError(f"dataset {repo!r} has no revision {revision!r}; check the "
                                  "@REVISION of data.train")
    if isinstance(exc, errors.EntryNotFoundError):
        return DatasetAccessError(f"dataset {repo!r} at {revision!r} no longer holds a file "
                                  f"the run reads ({exc})")
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return DatasetAccessError(f"HF_HUB_OFFLINE is set and dataset {repo!r} at "
                                  f"{revision[:12]} is not in the HF cache; unset it")
    if isinstance(exc, errors.HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status is not None and status not in TRANSIENT_STATUS:
            return DatasetAccessError(f"the Hub refused dataset {repo!r} ({exc})")
        return _unavailable(repo, exc)
    if isinstance(exc, (getattr(errors, "HTTPError", OSError), ConnectionError, TimeoutError)):
        return _unavailable(repo, exc)
    return None


def _unavailable(repo: str, exc: BaseException) -> DatasetUnavailableError:
    endpoint = os.environ.get("HF_ENDPOINT") or "the Hub"
    return DatasetUnavailableError(f"{endpoint} did not answer while reading dataset {repo!r} "
                                   f"({type(exc).__name__}: {str(exc)[:200]}); check the "
                                   "network and run again")


# -- which files are a split -------------------------------------------------------------------

def _data_files(files: list[str]) -> list[str]:
    return [f for f in files if PurePosixPath(f).suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in PurePosixPath(f).parts)]


def _splits(files: list[str], configs: list[dict[str, Any]], subset: Optional[str],
            repo: str) -> Optional[tuple[Optional[str], dict[str, list[str]]]]:
    """(subset, split -> files) from the main branch, or None when it holds no data file."""
    data = _data_files(files)
    if not data:
        return None
    if configs:
        config = _choose(configs, subset, repo)
        return config.get("config_name", "default"), _config_splits(config, data, repo)
    if subset is not None:
        data = [f for f in data if f.startswith(subset.rstrip("/") + "/")]
        if not data:
            tops = sorted({f.split("/")[0] for f in _data_files(files) if "/" in f})
            raise DataError(f"dataset {repo!r} declares no subsets and has no folder "
                            f"{subset!r}; its folders are: {', '.join(tops) or 'none'}. "
                            "Drop data.subset, or name one of them")
    return subset, _by_name(data)


def _choose(configs: list[dict[str, Any]], subset: Optional[str], repo: str) -> dict[str, Any]:
    names = [str(c.get("config_name", "default")) for c in configs]
    if subset is not None:
        if subset not in names:
            raise DataError(f"dataset {repo!r} has no subset {subset!r}; its subsets are: "
                            f"{', '.join(names)}. Set data.subset to one of them")
        return configs[names.index(subset)]
    default = [c for c in configs if c.get("default")] or [
        c for c in configs if c.get("config_name", "default") == "default"]
    if default or len(configs) == 1:
        return (default or configs)[0]
    raise DataError(f"dataset {repo!r} has several subsets: {', '.join(names)}; set "
                    "data.subset to the one to train on")


def _config_splits(config: dict[str, Any], data: list[str], repo: str) -> dict[str, list[str]]:
    """A `configs:` entry's data_files (a pattern, a list, or split/path items) as files."""
    base = str(config.get("data_dir", "")).strip("/")
    spec = config.get("data_files")
    if spec is None:
        return _by_name([f for f in data if not base or f.startswith(base + "/")])
    if isinstance(spec, (str, list)) and not (isinstance(spec, list) and spec
                                              and isinstance(spec[0], dict)):
        spec = [{"split": "train", "path": spec}]
    if isinstance(spec, dict):
        spec = [{"split": k, "path": v} for k, v in spec.items()]
    splits = {}
    for item in spec:
        patterns = item.get("path", [])
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        patterns = [f"{base}/{p}" if base else p for p in patterns]
        splits[str(item.get("split", "train"))] = sorted(
            f for f in data if any(fnmatch.fnmatchcase(f, p) for p in patterns))
    empty = [s for s, fs in splits.items() if not fs]
    if empty:
        raise DataError(f"dataset {repo!r}: the README's data_files for split(s) "
                        f"{', '.join(empty)} match no .parquet, .jsonl, .json or .csv file")
    return splits


def _by_name(data: list[str]) -> dict[str, list[str]]:
    """Splits from the words in the paths (train, validation/valid/dev, test/eval), as the
    Hub reads a repo without `configs:`; with no such word every file is train."""
    splits: dict[str, list[str]] = {}
    for path in data:
        words = [w for w in re.split(r"[-._ /0-9]+", str(PurePosixPath(path).with_suffix("")))
                 if w]
        split = next((s for w in words for s, names in SPLIT_WORDS.items()
                      if w.lower() in names), None)
        splits.setdefault(split, []).append(path)
    if set(splits) == {None}:
        return {"train": splits[None]}
    splits.pop(None, None)  # files named for no split, beside files that are: not data
    return {s: sorted(fs) for s, fs in splits.items()}


def _converted_splits(files: list[str], subset: Optional[str],
                      repo: str) -> tuple[str, dict[str, list[str]]]:
    """refs/convert/parquet holds <subset>/<split>/NNNN.parquet (partial-<split> when the
    Hub converted only the first rows of a large split)."""
    by_subset: dict[str, dict[str, list[str]]] = {}
    for path in files:
        parts = path.split("/")
        if len(parts) == 3 and parts[2].endswith(".parquet"):
            split = parts[1].removeprefix("partial-")
            by_subset.setdefault(parts[0], {}).setdefault(split, []).append(path)
    configs = [{"config_name": name} for name in sorted(by_subset)]
    if not configs:
        raise DataError(f"dataset {repo!r}: its {CONVERTED} branch holds no Parquet files")
    chosen = str(_choose(configs, subset, repo)["config_name"])
    return chosen, {s: sorted(fs) for s, fs in by_subset[chosen].items()}


def _no_data(repo: str, commit: str, files: list[str]) -> DataError:
    scripts = [f for f in files if f.endswith(".py")]
    if scripts:
        return DataError(
            f"dataset {repo!r} is built by a loading script ({', '.join(scripts)}), which Baton "
            f"does not run, and the Hub has no {CONVERTED} branch of it; convert it to Parquet "
            "or JSON lines (datasets' push_to_hub does) and point data.train at that repo")
    return DataError(f"dataset {repo!r} at commit {commit[:12]} holds no .parquet, .jsonl, "
                     f".json or .csv file; its files are: {', '.join(files[:20]) or 'none'}")
