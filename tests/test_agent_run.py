"""`agent.py run` end to end, as a subprocess against real stores (a folder and SeaweedFS).

Each agent run trains a tiny fp32 Llama for a few steps; the whole file takes a few minutes on
two CPU cores, most of it the agents' own start-up (importing torch and transformers).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from tests.agent_helpers import (
    ROOT,
    RunningAgent,
    agent_env,
    build_tiny_model,
    open_run,
    run_agent,
    write_config,
    write_data,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agent-inputs")
    return {"model": build_tiny_model(folder / "tiny"), "data": write_data(folder / "train.jsonl")}


@pytest.fixture(params=["local", "s3", "hub"])
def agent_store(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "s3":
        return request.getfixturevalue("s3_server").new_bucket_uri()
    return request.getfixturevalue("hub_server").new_repo_uri()


def head_of(uri: str, run: str = "t"):
    got = open_run(uri, run).read_head()
    assert got is not None, f"no HEAD.json in {uri}"
    return got[0]


def sessions_of(uri: str, run: str = "t"):
    return open_run(uri, run).read_sessions()


# -- the clock -----------------------------------------------------------------------------

@pytest.mark.slow
def test_pauses_on_its_own_before_the_session_limit(tiny, tmp_path):
    """DESIGN.md: stop with the checkpoint committed before session_start + limit."""
    uri = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                          train={"max_steps": 10_000}, data={"eval": 0.1})
    limit = 40.0
    started = time.time()
    start_iso = datetime.fromtimestamp(started, timezone.utc).isoformat()
    done = run_agent(config, "--session-start", start_iso, "--session-limit", f"{limit:.0f}s",
                     workdir=tmp_path / "work")
    exited = time.time()
    assert done.returncode == 75, done.stdout + done.stderr
    head = head_of(uri)
    record = sessions_of(uri)[-1]
    assert head.checkpoint is not None and head.step >= 1 and not head.finished
    assert record.end_step == head.step and record.exit_code == 75
    assert record.ended.timestamp() < started + limit
    assert exited < started + limit, f"the agent exited {exited - started:.1f}s after start"
    # The base eval before step 1 is counted in the record; later evals keep to eval.every.
    assert record.base_eval_loss is not None and record.eval_seconds
    assert record.timings.tail > 0 and record.timings.eval > 0
    assert "session time nearly spent" in done.stdout
    check_pull_fallback(config, uri, head, tmp_path)


def check_pull_fallback(config, uri: str, head, tmp_path) -> None:
    """A corrupt HEAD checkpoint: the next session says so and uses the one before it; with
    every checkpoint corrupt it stops with exit 1, leaving the store and HEAD as they were.
    (--session-limit 1s: the deadline has passed, so the agent pulls but does not train.)"""
    if head.previous is None:
        pytest.skip("the session committed a single checkpoint; no fallback to test")
    folder = tmp_path / "store" / "t" / "checkpoints"
    (folder / head.checkpoint / "adapter_model.safetensors").write_bytes(b"corrupt")
    fell = run_agent(config, "--session-limit", "1s", workdir=tmp_path / "w2")
    assert fell.returncode == 75, fell.stdout + fell.stderr
    assert f"checkpoint {head.checkpoint} failed verification" in fell.stdout
    assert f"resuming from the one before it, {head.previous}" in fell.stdout

    (folder / head.previous / "cursor.json").write_bytes(b"{}")
    for other in folder.iterdir():
        if other.name not in (head.checkpoint, head.previous):
            shutil.rmtree(other)
    broken = run_agent(config, "--session-limit", "1s", workdir=tmp_path / "w3")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "no checkpoint" in broken.stderr and "verifies" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert head_of(uri).checkpoint == head.checkpoint
    assert not open_run(uri).read_lease()[0].live(), "the lease is released after a failure"
    assert sessions_of(uri)[-1].exit_code == 1


# -- pause on a signal, the lease, resume, finish --------------------------------------------

@pytest.mark.slow
def test_signal_pause_lease_resume_finish(tiny, tmp_path, agent_store):
    uri = agent_store
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri)

    # 1. SIGTERM mid-run: the step finishes, a checkpoint is committed, exit 75. A T4-like
    # session: fp16 with a loss scaler.
    agent = RunningAgent(config, "--precision", "fp16", workdir=tmp_path / "work1")
    try:
        agent.wait_for(r"^step 2/6 ")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.finish() == 75, agent.text()
    finally:
        agent.kill()
    head = head_of(uri)
    first = sessions_of(uri)[-1]
    assert 2 <= head.step < 6 and not head.finished
    assert head.checkpoint.startswith(f"{head.step:08d}-g"), "HEAD names the step it paused at"
    assert first.end_step == head.step and first.exit_code == 75 and first.precision == "fp16"
    assert (first.attention, first.padding_free) == ("sdpa_spans", True)  # the default layout
    assert "SIGTERM received" in agent.text()

    # 2. Another live agent holds the lease: exit 73, nothing changed.
    from baton.handoff.lease import LeaseManager

    other = LeaseManager(open_run(uri), holder="someone-else", host="kaggle-vm", ttl=600)
    other.acquire()
    lease_before, head_before = open_run(uri).read_lease(), open_run(uri).read_head()
    held = run_agent(config, workdir=tmp_path / "work2")
    assert held.returncode == 73, held.stdout + held.stderr
    assert "kaggle-vm" in held.stderr and "--takeover" in held.stderr
    assert open_run(uri).read_lease() == lease_before
    assert open_run(uri).read_head() == head_before
    assert len(sessions_of(uri)) == 1
    other.release()

    # 3. Released: the next session resumes at that step and finishes, on a "fresh machine"
    # without the data file (fetched from the store), with another micro-batch size and in
    # another precision (an A100-like bf16 session), on padded micro-batches.
    fresh = write_config(tmp_path, model_dir=tiny["model"], train_file=tmp_path / "absent.jsonl",
                         store=uri)
    done = run_agent(fresh, "--micro-batch-size", "1", "--precision", "bf16",
                     "--no-padding-free", workdir=tmp_path / "work3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((tmp_path / "work3" / "data").glob("*.jsonl")), "data came from the store"
    # Tokenized once for the run: the first session stored the encoding, this one loaded it.
    assert "data: encoded once for the run, loaded from" in done.stdout, done.stdout
    assert "stored as t/cache/encoded/" in agent.text()
    second = sessions_of(uri)[-1]
    assert second.start_step == head.step and second.end_step == 6
    from baton.handoff import open_store
    from baton.session.status import collect_status

    shown = collect_status(open_store(uri), "t")["sessions"]
    assert [s["precision"] for s in shown] == ["fp16", "bf16"], "status shows each precision"
    assert [(s["attention"], s["padding_free"]) for s in shown] == [
        ("sdpa_spans", True), ("sdpa", False)], "and each session's attention and layout"
    final = head_of(uri)
    assert final.finished and final.step == 6 and final.generation == other.generation + 1

    # 4. A finished run exits 0 at once, without a new session.
    again = run_agent(config, workdir=tmp_path / "work4")
    assert again.returncode == 0 and "finished" in again.stdout
    assert len(sessions_of(uri)) == 2


# -- fencing -------------------------------------------------------------------------------

@pytest.mark.slow
def test_agent_that_loses_its_lease_stops_without_writing(tiny, tmp_path):
    from baton.handoff.lease import LeaseManager

    uri = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                          train={"max_steps": 10_000})
    agent = RunningAgent(config, workdir=tmp_path / "work", lease_ttl=3)
    try:
        agent.wait_for(r"^step 1/")
        successor = LeaseManager(open_run(uri), holder="successor", ttl=600)
        successor.acquire(takeover=True)
        code = agent.finish()
    finally:
        agent.kill()
    assert code == 1, agent.text()
    assert "owns run 't' now" in agent.text()
    head = head_of(uri)
    assert head.generation == successor.generation
    lease = open_run(uri).read_lease()[0]
    assert lease.holder == "successor" and not lease.released
    record = sessions_of(uri)[-1]
    assert record.exit_code is None, "a fenced agent writes nothing, not even its record"


# -- invalid input: exit 2, a message, nothing written ----------------------------------------

def run_quick(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "agent.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=agent_env(**env))


BAD_CONFIGS = {
    "unknown key": ({"lora": {"rank": 8}}, "lora.rank: unknown key"),
    "bad value": ({"lora": {"r": 0}}, "lora.r"),
    "batch not a multiple": ({"train": {"batch_size": 3}}, "multiple of"),
    "bad duration": ({"checkpoint": {"every": "soon"}}, "checkpoint.every"),
    "missing data": ({"data": {"train": "/nonexistent/train.jsonl"}}, "does not exist"),
    "bad start": ({"session": {"start": "yesterday"}}, "ISO 8601"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_invalid_config_exits_2_and_writes_nothing(tiny, tmp_path, case):
    sections, message = BAD_CONFIGS[case]
    store = tmp_path / "store"
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=str(store),
                          **sections)
    done = run_quick(["run", "--config", str(config), "--workdir", str(tmp_path / "w")])
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


def test_malformed_yaml_exits_2_with_its_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run: t\nmodel: [unclosed\n")
    done = run_quick(["run", "--config", str(config)])
    assert done.returncode == 2
    assert "not valid YAML at line" in done.stderr


def test_config_is_refused_before_torch_is_imported(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("run: t\nstore: s\nmodel: {name: m}\ndata: {train: x}\nbogus: 1\n")
    probe = ("import sys, agent; code = agent.main(['run', '--config', sys.argv[1]]); "
             "print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr


def test_secrets_never_reach_the_output(tmp_path):
    secret = "hf_" + "Q" * 12 + "x7" * 10
    done = run_quick(["run", "--config", f"/nonexistent/{secret}/run.yaml"], HF_TOKEN=secret)
    assert done.returncode == 2
    assert secret not in done.stderr + done.stdout
    assert "<HF_TOKEN>" in done.stderr


def test_spec_mismatch_names_each_field_and_writes_nothing(tiny, tmp_path):
    from baton.session.spec import prepare_spec

    import agent

    uri = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri)
    args = agent.build_parser().parse_args(["run", "--config", str(config)])
    prepare_spec(open_run(uri), agent.load_config(args))  # the run as a first session made it
    before = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}

    changed = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                           lora={"r": 8}, train={"batch_size": 4, "micro_batch_size": 1},
                           checkpoint={"every": "1m"})
    done = run_quick(["run", "--config", str(changed), "--workdir", str(tmp_path / "w")])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "lora.r: the run has 4, the config says 8" in done.stderr
    assert "train.batch_size: the run has 2, the config says 4" in done.stderr
    assert "micro_batch_size" not in done.stderr and "checkpoint.every" not in done.stderr
    after = {p: p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert after == before
    spec = json.loads((tmp_path / "store" / "t" / "spec.json").read_text())
    assert spec["model"]["revision"].startswith("local:"), "the model revision is pinned"


def test_scrub_hides_credentials_but_keeps_commit_ids(monkeypatch):
    from baton.handoff.secrets import scrub

    aws = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    commit = "0123456789abcdef0123456789abcdef01234567"
    text = scrub(f"auth {aws} failed; token hf_{'a1B2' * 8}; model at {commit}")
    assert aws not in text and "hf_a1B2" not in text
    assert "<AWS_SECRET_ACCESS_KEY>" in text and commit in text


# -- the store down at the deadline: spool, then push from the next session -----------------

@pytest.mark.slow
def test_final_checkpoint_spooled_when_store_is_down_and_pushed_next_session(
        tiny, tmp_path, monkeypatch):
    import agent
    from baton.handoff import StoreUnavailableError
    from baton.handoff.lease import LeaseManager
    from baton.state_schema import SessionRecord
    from baton.session.clock import SessionClock
    from baton.training.engine import Trainer
    from baton.session.checkpointer import Checkpointer
    from baton.session.spec import prepare_spec

    uri, workdir = str(tmp_path / "store"), tmp_path / "work"
    config_path = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                               store=uri)
    config = agent.load_config(agent.build_parser().parse_args(["run", "--config",
                                                                str(config_path)]))
    runstore = open_run(uri)
    spec = prepare_spec(runstore, config)
    lease = LeaseManager(runstore, ttl=600)
    lease.acquire()
    trainer = Trainer(spec, data_path=tiny["data"], micro_batch_size=2, device="cpu")
    trainer.train_step()

    def down(*_args, **_kwargs):
        raise StoreUnavailableError("store unreachable (test)")

    monkeypatch.setattr(runstore.store, "publish", down)
    checkpoints = Checkpointer(runstore, lease, spec, workdir, SessionRecord(
        session_id="s", host="h"), SessionClock(0.0, None), every=1800)
    try:
        spooled = checkpoints.commit_now(trainer, finished=False)
    finally:
        checkpoints.close()
    assert spooled is not None and spooled.step == 1
    assert (spooled.path / "adapter_model.safetensors").is_file()
    assert runstore.read_head()[0].checkpoint is None, "nothing reached the store"
    monkeypatch.undo()
    lease.release()

    pushed = run_agent(config_path, "--session-limit", "1s", workdir=workdir)
    assert pushed.returncode == 75, pushed.stdout + pushed.stderr
    assert "pushed checkpoint 00000001-g2" in pushed.stdout
    head = head_of(uri)
    assert head.checkpoint == "00000001-g2" and head.step == 1
    assert not spooled.path.exists(), "the spool is emptied once pushed"


# -- more than one GPU: one rank a device, rank 0 speaks for the session ---------------------

@pytest.mark.slow
def test_two_ranks_train_one_run_data_parallel(tiny, tmp_path):
    """BATON_WORLD_SIZE=2 stands in for a 2-GPU machine: two CPU ranks over gloo."""
    uri = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"], store=uri,
                          train={"max_steps": 3, "batch_size": 2, "micro_batch_size": 1},
                          data={"eval": 0.1})
    done = subprocess.run(
        [sys.executable, str(ROOT / "agent.py"), "run", "--config", str(config), "--workdir",
         str(tmp_path / "work"), "--log-every", "0"], cwd=ROOT, capture_output=True,
        text=True, timeout=400, env=agent_env(BATON_WORLD_SIZE="2"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "x2 ranks (DDP)" in done.stdout
    assert done.stdout.count("finished: step 3/3") == 1, "only rank 0 speaks"
    head = head_of(uri)
    assert head.finished and head.step == 3
    record = sessions_of(uri)[-1]
    assert [step for step, _ in record.losses] == [1, 2, 3]
    assert record.eval_losses, "eval ran on both ranks' shares"
    encoded = sorted(p.name for p in (tmp_path / "work" / "data").glob("encoded-*"))
    assert len(encoded) == 1 and ".rank" not in encoded[0], "rank 1 used rank 0's encoding"
