"""Hub datasets as training data, through the real huggingface_hub client against the Hub
double's dataset repos: pinning, file choice, access errors, later sessions, plan, and one
`agent.py run` that trains on a Hub dataset end to end."""

from __future__ import annotations

import io
import itertools
import os
from typing import Optional

import pytest

from baton.state_schema import RunConfig
from tests.agent_helpers import open_run, run_agent, write_config
from baton.training.data import DataError, fingerprint
from baton.training.hub_data import CONVERTED, DatasetUnavailableError, _by_name, _config_splits, pin

NAMES = itertools.count(1)
README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# Quotes
"""


def parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def quotes(n: int, start: int = 0) -> list[dict]:
    return [{"quote": f"Quote {i}: the loss goes down slowly.", "author": f"A{i % 3}"}
            for i in range(start, start + n)]


def quotes_repo(hub, **access) -> str:
    """A dataset like Abirate/english_quotes: two train shards and a test split in Parquet."""
    repo = f"someone/quotes-{os.getpid()}-{next(NAMES)}"
    hub.datasets.put(repo, {
        "README.md": README.encode(), ".gitattributes": b"*.parquet filter=lfs\n",
        "data/train-00000-of-00002.parquet": parquet(quotes(12)),
        "data/train-00001-of-00002.parquet": parquet(quotes(8, 12)),
        "data/test-00000-of-00001.parquet": parquet(quotes(4, 20))}, **access)
    return repo


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    """The Hub double with an HF cache of this test's own (a fresh machine)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return hub_server


def config(repo: str, model: str = "m", **data) -> RunConfig:
    return RunConfig(run="h", store="/tmp/none", model={"name": model, "load_in_4bit": False},
                     data={"train": f"hf://datasets/{repo}", **data})


def in_process_run(tmp_path, cfg_path, capsys) -> tuple[int, str]:
    """`agent.py run` in this process (its argument parsing, config and session code, without
    the subprocess): the exit code and what it printed to stderr."""
    import agent as cli

    argv = ["run", "--config", str(cfg_path), "--workdir", str(tmp_path / "work"),
            "--log-every", "0"]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    capsys.readouterr()
    code = cli.cmd_run(args)
    return code, capsys.readouterr().err


def hub_config(tmp_path, tiny_model_dir, repo: str, sections: Optional[dict] = None, **data):
    return write_config(tmp_path, model_dir=tiny_model_dir, train_file=f"hf://datasets/{repo}",
                        store=str(tmp_path / "store"),
                        data={"columns": {"text": "quote"}, **data}, **(sections or {}))


def store_files(tmp_path) -> list[str]:
    store = tmp_path / "store"
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()) \
        if store.exists() else []


# -- which files a split is --------------------------------------------------------------------

def test_splits_from_file_names_and_from_readme_configs():
    assert _by_name(["data/train-00000.parquet", "data/validation.jsonl", "test.csv",
                     "LICENSE.csv"]) == {"train": ["data/train-00000.parquet"],
                                         "validation": ["data/validation.jsonl"],
                                         "test": ["test.csv"]}
    assert _by_name(["quotes.jsonl"]) == {"train": ["quotes.jsonl"]}  # no split word: train
    data = ["en/a.parquet", "en/b.parquet", "fr/a.parquet"]
    assert _config_splits({"data_files": "en/*"}, data, "r") == {
        "train": ["en/a.parquet", "en/b.parquet"]}
    assert _config_splits({"data_dir": "fr"}, data, "r") == {"train": ["fr/a.parquet"]}
    assert _config_splits({"data_files": {"train": "en/a*", "test": ["en/b*"]}}, data, "r") == {
        "train": ["en/a.parquet"], "test": ["en/b.parquet"]}
    with pytest.raises(DataError, match="split.s. test match no"):
        _config_splits({"data_files": [{"split": "test", "path": "de/*"}]}, data, "r")


def test_pin_reads_the_readme_configs_at_a_commit(hub):
    repo = quotes_repo(hub)
    pinned = pin(repo, None, None)
    assert len(pinned.revision) == 40 and pinned.ref == "main" and pinned.subset == "default"
    assert pinned.files("train") == ["data/train-00000-of-00002.parquet",
                                     "data/train-00001-of-00002.parquet"]
    with pytest.raises(DataError, match="the splits there are: test, train"):
        pinned.files("validation")
    with pytest.raises(DataError, match="no subset 'fr'; its subsets are: default"):
        pin(repo, None, "fr")
    old = pinned.revision
    hub.datasets.put(repo, {"train.jsonl": b'{"text": "new"}\n'})  # main moves on
    assert pin(repo, old, None).files("train") == pinned.files("train")
    with pytest.raises(DataError, match="no revision 'v2'"):
        pin(repo, "v2", None)


def test_a_loading_script_is_read_through_its_parquet_conversion_or_refused(hub):
    repo = f"someone/scripted-{next(NAMES)}"
    hub.datasets.put(repo, {"README.md": b"# scripted\n", "scripted.py": b"import datasets\n"})
    with pytest.raises(DataError, match=r"loading script \(scripted.py\).*convert it"):
        pin(repo, None, None)
    hub.datasets.put(repo, {"en/train/0000.parquet": parquet(quotes(3)),
                            "en/partial-test/0000.parquet": parquet(quotes(2)),
                            "fr/train/0000.parquet": parquet(quotes(1))}, branch=CONVERTED)
    with pytest.raises(DataError, match="several subsets: en, fr; set data.subset"):
        pin(repo, None, None)
    pinned = pin(repo, None, "en")
    assert pinned.ref == CONVERTED and pinned.splits == {
        "train": ["en/train/0000.parquet"], "test": ["en/partial-test/0000.parquet"]}
    assert pin(repo, CONVERTED, "fr").splits == {"train": ["fr/train/0000.parquet"]}


# -- access --------------------------------------------------------------------------------

def test_a_private_dataset_is_read_with_the_token_and_refused_without(hub, monkeypatch):
    from baton.session.hub_source import inspect_hub

    repo = quotes_repo(hub, private=True)
    found = inspect_hub(config(repo, columns={"text": "quote"}, eval="test"))
    assert len(found.records) == 20 and found.records[0] == {"text": quotes(1)[0]["quote"]}
    assert found.hub.eval_files == ["data/test-00000-of-00001.parquet"] and found.eval_sha256
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(DataError, match="private and HF_TOKEN is missing"):
        pin(repo, None, None)


@pytest.mark.parametrize("with_token", [True, False])
def test_a_gated_dataset_exits_2_naming_the_fix(hub, tmp_path, tiny_model_dir, capsys,
                                                monkeypatch, with_token):
    repo = quotes_repo(hub, gated=True)
    if not with_token:
        monkeypatch.delenv("HF_TOKEN")  # 401 GatedRepo; with the token, 403
    code, err = in_process_run(tmp_path, hub_config(tmp_path, tiny_model_dir, repo), capsys)
    assert code == 2, err
    assert "is gated: accept its terms on" in err and f"/datasets/{repo}" in err
    assert "set HF_TOKEN" in err and store_files(tmp_path) == []


def test_a_missing_split_exits_2_listing_the_splits(hub, tmp_path, tiny_model_dir, capsys):
    repo = quotes_repo(hub)
    cfg = hub_config(tmp_path, tiny_model_dir, repo, split="training")
    code, err = in_process_run(tmp_path, cfg, capsys)
    assert code == 2 and "split 'training'" in err and "splits there are: test, train" in err
    assert store_files(tmp_path) == []


def test_a_hub_that_does_not_answer_exits_1_with_nothing_written(hub, tmp_path, tiny_model_dir,
                                                                 capsys, monkeypatch):
    repo = quotes_repo(hub)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    code, err = in_process_run(tmp_path, hub_config(tmp_path, tiny_model_dir, repo), capsys)
    assert code == 1 and "127.0.0.1:9 did not answer" in err and "run again" in err
    assert store_files(tmp_path) == []
    with pytest.raises(DatasetUnavailableError):
        pin(repo, None, None)


# -- later sessions and plan ---------------------------------------------------------------

def test_later_sessions_read_the_pinned_commit_and_refuse_a_vanished_one(
        hub, tmp_path, monkeypatch, tiny_model_dir):
    import huggingface_hub.constants as hf_constants

    from baton.scripts.eval import fetch_inputs
    from baton.session.spec import local_inputs, new_spec, spec_differences
    from baton.training.columns import load_records

    repo = quotes_repo(hub)
    cfg = config(repo, str(tiny_model_dir), columns={"text": "quote"}, eval="test")
    spec = new_spec(open_run(str(tmp_path / "store")), cfg)
    assert spec.data.hub.revision == pin(repo, None, None).revision
    assert store_files(tmp_path) == []  # the Hub commit is the copy: nothing uploaded
    hub.datasets.put(repo, {"train.jsonl": b'{"quote": "other data"}\n'})  # main moves on
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "fresh-machine"))
    train, held = local_inputs(None, spec, cfg, tmp_path / "work")
    records = load_records(train, spec.data.columns, spec.data.format)
    assert len(records) == 20 and records[0]["text"].startswith("Quote 0")
    assert len(load_records(held, spec.data.columns, spec.data.format)) == 4
    got = fetch_inputs(None, spec, tmp_path / "eval-work")  # eval.py: the same files
    assert [fingerprint(p) for p in got] == [spec.data.sha256, spec.data.eval_sha256]
    assert spec_differences(spec, cfg) == []  # main moved: still the run's config
    moved = spec_differences(spec, config(repo, str(tiny_model_dir), columns={"text": "quote"},
                                          split="test", eval=0.1))
    assert any(d.startswith("data.split: the run has 'train'") for d in moved)
    assert any(d.startswith("data.eval: the run has 'test'") for d in moved)
    hub.datasets.forget(repo, spec.data.hub.revision)  # history rewritten: the commit is gone
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "another-machine"))
    with pytest.raises(DataError, match="no other data.*start a new run"):
        local_inputs(None, spec, cfg, tmp_path / "work2")


def test_plan_counts_a_hub_datasets_samples(hub, tiny_model_dir):
    from baton.session.plan import PlanError, plan

    repo = quotes_repo(hub)
    base = {"run": "p", "store": "/tmp/none", "model": {"name": str(tiny_model_dir)},
            "train": {"batch_size": 4, "micro_batch_size": 2, "epochs": 1}}
    result = plan(RunConfig(**base, data={"train": f"hf://datasets/{repo}", "eval": "test",
                                          "columns": {"text": "quote"}}))
    assert result["samples"] == 20 and result["steps_total"] == 5
    with pytest.raises(PlanError, match="split 'dev'"):
        plan(RunConfig(**base, data={"train": f"hf://datasets/{repo}", "split": "dev"}))


# -- one agent run, end to end -------------------------------------------------------------

def test_agent_trains_on_a_hub_dataset(hub, tmp_path, tiny_model_dir):
    repo = quotes_repo(hub)
    cfg = hub_config(tmp_path, tiny_model_dir, f"{repo}@main", eval="test",
                     sections={"train": {"max_steps": 2}})
    done = run_agent(cfg, workdir=tmp_path / "work", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    runstore = open_run(str(tmp_path / "store"))
    spec = runstore.read_spec()
    assert spec.data.hub.repo == repo and spec.data.hub.split == "train"
    assert spec.data.columns == {"text": "quote"} and spec.data.format == "text"
    assert spec.data.hub.revision == pin(repo, None, None).revision  # "main", pinned
    assert runstore.read_head()[0].step == 2
    assert not any(f.startswith("t/data/") for f in store_files(tmp_path))
    assert [s.exit_code for s in runstore.read_sessions()] == [0]
