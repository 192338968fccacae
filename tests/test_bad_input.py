"""The bad-input catalogue: each mistake a person can make gets exit 2 (or the documented code),
a message that names the fix, no traceback, and nothing written to the store.

Every case runs `agent.py run` as a subprocess and snapshots the store (every key and its
bytes) before and after. Cases refused at config validation cost about a second; those that
reach the stored run cost an import of the training stack.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_helpers import AGENT, ROOT, agent_env, build_tiny_model, open_run, write_config, \
    write_data

RUN = "t"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-input")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


def agent(config: Path, tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(AGENT), "run", "--config", str(config),
               "--workdir", str(tmp_path / "work"), "--log-every", "0", *flags]
    full = agent_env(**env)
    full.update(BATON_TEST_RETRY="2,5")  # fail fast, same path
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env=full)


def snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def s3_snapshot(server, uri: str) -> dict[str, bytes]:
    bucket = uri[len("s3://"):].split("/", 1)[0]
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in sorted(keys)}


def refused(done: subprocess.CompletedProcess, *phrases: str, code: int = 2) -> None:
    """The documented exit code, every phrase in the message, and no traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == code, f"exit {done.returncode}, expected {code}:\n{output[-3000:]}"
    for phrase in phrases:
        assert phrase in done.stderr, f"{phrase!r} not in the message:\n{done.stderr[-3000:]}"
    assert "Traceback" not in output, f"a traceback instead of a message:\n{output[-3000:]}"


def created_run(tiny, tmp_path: Path) -> tuple[Path, str]:
    """A run whose spec and data are in a local store, as its first session left them."""
    import agent as cli
    from baton.session.spec import prepare_spec

    uri = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri)
    args = cli.build_parser().parse_args(["run", "--config", str(config)])
    prepare_spec(open_run(uri), cli.load_config(args))
    return config, uri


# -- refused by the config alone -------------------------------------------------------------

def test_malformed_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"run: t\nstore: {tmp_path / 'store'}\nlora: {{r: 4, alpha: [8}}\n")
    done = agent(config, tmp_path)
    refused(done, "not valid YAML at line 3", "fix the syntax")
    assert snapshot(tmp_path / "store") == {}


@pytest.mark.parametrize("section, key", [("lora", {"rnak": 8}), ("train", {"learning_rate": 1e-4}),
                                          ("chekpoint", {"every": "5m"})])
def test_unknown_or_misspelled_key(tiny, tmp_path, section, key):
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store=str(tmp_path / "store"), **{section: key})
    done = agent(config, tmp_path)
    name = next(iter(key))
    where = section if section == "chekpoint" else f"{section}.{name}"
    refused(done, f"{where}: unknown key", "fix its spelling")
    assert snapshot(tmp_path / "store") == {}


def test_run_name_with_path_tricks(tiny, tmp_path):
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store=str(tmp_path / "store"))
    done = agent(config, tmp_path, "--run", "../x")
    refused(done, "'../x'", "letters, digits")
    assert snapshot(tmp_path / "store") == {} and not (tmp_path / "x").exists()


def test_missing_data_file(tiny, tmp_path):
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tmp_path / "nope.jsonl",
                          store=str(tmp_path / "store"))
    done = agent(config, tmp_path)
    refused(done, "nope.jsonl", "does not exist")
    assert snapshot(tmp_path / "store") == {}


# -- refused when the run is read or created -------------------------------------------------

def test_empty_data_file(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=empty,
                          store=str(tmp_path / "store"))
    done = agent(config, tmp_path)
    refused(done, "empty.jsonl", "empty")
    assert snapshot(tmp_path / "store") == {}


def test_data_changed_since_the_run_was_created(tiny, tmp_path):
    config, uri = created_run(tiny, tmp_path)
    before = snapshot(tmp_path / "store")
    changed = write_data(tmp_path / "train.jsonl", seed=1)  # same path, other bytes
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=changed, store=uri)
    done = agent(config, tmp_path)
    refused(done, "data.train", "other bytes", "new run name")
    assert snapshot(tmp_path / "store") == before


def test_different_base_model_and_lora_shape(tiny, tmp_path):
    config, uri = created_run(tiny, tmp_path)
    before = snapshot(tmp_path / "store")
    other = tmp_path / "other-model"
    shutil.copytree(tiny["model"], other)
    settings = json.loads((other / "config.json").read_text())
    settings["rms_norm_eps"] = settings.get("rms_norm_eps", 1e-6) * 10
    (other / "config.json").write_text(json.dumps(settings))
    config = write_config(tmp_path, model_dir=other, train_file=tiny["data"], store=uri,
                          lora={"r": 8, "target_modules": ["q_proj"]})
    done = agent(config, tmp_path)
    refused(done, "model.name: the run has", "lora.r: the run has 4, the config says 8",
            "lora.target_modules", "pick a new run name")
    assert snapshot(tmp_path / "store") == before


def test_newer_state_schema(tiny, tmp_path):
    config, uri = created_run(tiny, tmp_path)
    spec_path = tmp_path / "store" / RUN / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["schema_version"] = "9.0"
    spec_path.write_text(json.dumps(spec))
    before = snapshot(tmp_path / "store")
    done = agent(config, tmp_path)
    refused(done, "schema 9.0", "upgrade Baton")
    assert snapshot(tmp_path / "store") == before


def test_corrupted_head(tiny, tmp_path):
    config, uri = created_run(tiny, tmp_path)
    (tmp_path / "store" / RUN / "HEAD.json").write_text('{"checkpoint": "00000004-g1", "ste')
    before = snapshot(tmp_path / "store")
    done = agent(config, tmp_path)
    refused(done, "HEAD.json", "corrupted")
    assert snapshot(tmp_path / "store") == before


def test_checkpoint_whose_hash_does_not_match(tiny, tmp_path):
    """HEAD's only checkpoint was altered: no checkpoint verifies, so the session must stop
    before training. The lease and the session record may be written (the pull happens under
    the lease); HEAD and the checkpoints must not change."""
    from baton.handoff.checkpoint import commit_checkpoint

    config, uri = created_run(tiny, tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "cursor.json").write_text("{}")
    cid = commit_checkpoint(open_run(uri), folder, step=2, generation=1)
    adapter = tmp_path / "store" / RUN / "checkpoints" / cid / "adapter_model.safetensors"
    adapter.write_bytes(os.urandom(2048))
    files = {k: v for k, v in snapshot(tmp_path / "store").items() if "/checkpoints/" in k}
    done = agent(config, tmp_path)
    # Exit 1, not 2: nothing in the config is wrong, the store's copy is damaged.
    refused(done, cid, "does not match its sha256", "Restore the files", code=1)
    after = snapshot(tmp_path / "store")
    assert {k: v for k, v in after.items() if "/checkpoints/" in k} == files
    head = json.loads(after[f"{RUN}/HEAD.json"])
    assert head["checkpoint"] == cid and head["step"] == 2, "HEAD still names the same commit"


# -- the store itself ----------------------------------------------------------------------

def s3_config(tiny, tmp_path: Path, uri: str) -> Path:
    return write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri)


def test_wrong_s3_credentials(tiny, tmp_path, s3_server):
    uri = s3_server.new_bucket_uri()
    wrong = "WRONG" + s3_server.secret_key[5:]
    done = agent(s3_config(tiny, tmp_path, uri), tmp_path, AWS_SECRET_ACCESS_KEY=wrong)
    refused(done, "refused the credentials", "AWS_SECRET_ACCESS_KEY")
    assert wrong not in done.stdout + done.stderr
    assert s3_snapshot(s3_server, uri) == {}


def test_missing_s3_credentials(tiny, tmp_path, s3_server, monkeypatch):
    uri = s3_server.new_bucket_uri()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    done = agent(s3_config(tiny, tmp_path, uri), tmp_path)
    refused(done, "no usable AWS credentials", "AWS_ACCESS_KEY_ID")
    assert s3_snapshot(s3_server, uri) == {}


def test_bucket_that_does_not_exist(tiny, tmp_path, s3_server):
    uri = "s3://baton-no-such-bucket-0451/runs"
    done = agent(s3_config(tiny, tmp_path, uri), tmp_path)
    refused(done, "'baton-no-such-bucket-0451' does not exist", "create it")


def test_unreachable_endpoint(tiny, tmp_path, s3_server):
    """Nothing answers at the endpoint: a typo in AWS_ENDPOINT_URL or an outage. Exit 1 (run
    again later), with the endpoint and the variable named, and nothing trained."""
    done = agent(s3_config(tiny, tmp_path, "s3://baton-unreachable/runs"), tmp_path,
                 AWS_ENDPOINT_URL="http://127.0.0.1:9")
    refused(done, "http://127.0.0.1:9", "AWS_ENDPOINT_URL", code=1)


def test_hub_that_does_not_answer_while_pinning_the_model(tiny, tmp_path):
    """Pinning a Hub model's revision when the Hub does not answer is an outage, not a config
    error: exit 1 (run again later), the endpoint named, nothing written."""
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store=str(tmp_path / "store"),
                          model={"name": "someone/some-model", "load_in_4bit": False})
    done = agent(config, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    refused(done, "127.0.0.1:9", "run again", code=1)
    assert snapshot(tmp_path / "store") == {}


@pytest.mark.parametrize("env,phrase", [
    ({"BATON_KERNELS": "fast"}, "not a kernel path"),
    ({"BATON_KERNELS": "triton", "TRITON_INTERPRET": "0"}, "interpreter"),
])
def test_kernel_choice_this_machine_cannot_honour(tiny, tmp_path, env, phrase):
    """A BATON_KERNELS that cannot run here (a typo; Triton on a CPU without the interpreter,
    like Triton on a GPU below sm_75) is invalid input: exit 2 before the lease is taken."""
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store=str(tmp_path / "store"))
    done = agent(config, tmp_path, **env)
    refused(done, phrase, "BATON_KERNELS")
    assert snapshot(tmp_path / "store") == {}, "refused before the run was created"
