"""`status`: read a run from the store alone, without the lease, on every backend."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from baton.handoff import open_store
from baton.session.status import collect_status, status_main
from baton.state_schema import (
    Cursor, DataSpec, FileEntry, Head, Lease, LoraConfig, Manifest, ModelConfig, RunSpec,
    SessionRecord, TrainSpec, utcnow,
)

RUN = "demo-run"


def _spec() -> RunSpec:
    return RunSpec(
        run=RUN, model=ModelConfig(name="tiny/llama"), lora=LoraConfig(),
        data=DataSpec(source="d.jsonl", key=f"{RUN}/data/abc.jsonl", sha256="abc",
                      format="pairs", eval=0.05, max_seq_len=128, packing=False),
        train=TrainSpec(max_steps=200, batch_size=8, lr=1e-4, schedule="linear", warmup=0.0,
                        optimizer="adamw", max_grad_norm=1.0, weight_decay=0.0, seed=1),
    )


def _session(sid: str, start: int, end: int, *, minutes_ago: float, wall_s: float,
             train_s: float, exit_code, gpu: str = "Tesla T4") -> SessionRecord:
    started = utcnow() - timedelta(minutes=minutes_ago)
    return SessionRecord(
        session_id=sid, host=f"host-{sid}", gpu=gpu, gpu_count=1, kernels="triton",
        precision="fp16", started=started,
        ended=None if exit_code is None else started + timedelta(seconds=wall_s),
        start_step=start, end_step=end, tokens=(end - start) * 1000, train_seconds=train_s,
        exit_code=exit_code, losses=[(s, 3.0 - s / 100) for s in range(start + 1, end + 1)],
        eval_losses=[(end, 2.9 - end / 100)] if exit_code is not None else [],
    )


def _checkpoint(store, step: int, gen: int, total: int, *, manifest: bool = True) -> str:
    cid = f"{step:08d}-g{gen}"
    base = f"{RUN}/checkpoints/{cid}"
    cursor = Cursor(step=step, total_steps=total, epoch=step // 100, epoch_position=step % 100,
                    samples_seen=step * 8, tokens_seen=step * 8000, loss=3.0 - step / 100,
                    eval_loss=2.9 - step / 100)
    store.write(f"{base}/cursor.json", cursor.to_json())
    store.write(f"{base}/adapter_model.safetensors", b"\0" * 64)
    if manifest:
        store.write(f"{base}/manifest.json", Manifest(
            checkpoint=cid, step=step, generation=gen,
            files={"cursor.json": FileEntry(sha256="x", size=1)}).to_json())
    return cid


def _lease(gen: int, *, live: bool, released: bool = False) -> Lease:
    expires = utcnow() + timedelta(minutes=10 if live else -10)
    return Lease(holder="agent-1", host="host-b", gpu="Tesla T4", generation=gen,
                 expires_at=expires, released=released)


def _paused_run(store) -> None:
    """Two sessions done (0->50, 50->100), both paused by their limit of 120 s."""
    store.write(f"{RUN}/spec.json", _spec().to_json())
    _checkpoint(store, 50, 1, 200)
    cid = _checkpoint(store, 100, 2, 200)
    _checkpoint(store, 120, 2, 200, manifest=False)  # an upload cut short: not HEAD
    store.write(f"{RUN}/HEAD.json", Head(checkpoint=cid, previous="00000050-g1", step=100,
                                         generation=2).to_json())
    store.write(f"{RUN}/lease.json", _lease(2, live=True, released=True).to_json())
    store.write(f"{RUN}/sessions/s1.json", _session(
        "s1", 0, 50, minutes_ago=30, wall_s=120, train_s=100, exit_code=75).to_json())
    store.write(f"{RUN}/sessions/s2.json", _session(
        "s2", 50, 100, minutes_ago=10, wall_s=120, train_s=100, exit_code=75).to_json())


def test_paused_run_on_every_backend(store):
    _paused_run(store)
    st = collect_status(store, RUN)
    assert st["state"] == "paused"
    assert (st["step"], st["total_steps"], st["epoch"]) == (100, 200, 1)
    assert (st["samples_seen"], st["tokens_seen"]) == (800, 800_000)
    assert st["checkpoint"] == "00000100-g2"
    assert st["loss"] == pytest.approx(2.0) and st["eval_loss"] == pytest.approx(1.9)
    assert st["lease"]["live"] is False and st["lease"]["host"] == "host-b"
    assert [s["host"] for s in st["sessions"]] == ["host-s1", "host-s2"]
    assert st["sessions"][0]["steps"] == 50 and st["sessions"][0]["tokens_per_s"] == 500.0
    assert st["sessions"][1]["kernels"] == "triton"
    assert [(c["id"], c["complete"]) for c in st["checkpoints"]] == [
        ("00000050-g1", True), ("00000100-g2", True), ("00000120-g2", False)]
    # 100 steps in 200 training s over 240 s of wall time; 120 s sessions -> 50 steps each
    assert st["sessions_left_estimate"] == 2
    json.dumps(st)  # the --json object is plain JSON


def test_states_new_running_finished(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.write(f"{RUN}/spec.json", _spec().to_json())
    st = collect_status(store, RUN)
    assert (st["state"], st["step"], st["total_steps"], st["checkpoint"]) == ("new", 0, 200, None)
    assert st["sessions_left_estimate"] is None  # nothing measured yet

    _paused_run(store)
    store.write(f"{RUN}/lease.json", _lease(3, live=True).to_json())
    store.write(f"{RUN}/sessions/s3.json", _session(
        "s3", 100, 130, minutes_ago=1, wall_s=0, train_s=60, exit_code=None).to_json())
    st = collect_status(store, RUN)
    assert st["state"] == "running" and st["lease"]["live"] is True
    assert st["sessions"][-1]["ended"] is None
    assert st["sessions_left_estimate"] == 2  # the open session is not measured yet

    _checkpoint(store, 200, 3, 200)
    store.write(f"{RUN}/HEAD.json", Head(checkpoint="00000200-g3", step=200, generation=3,
                                         finished=True).to_json())
    st = collect_status(store, RUN, session_limit_s=3600)
    assert (st["state"], st["step"], st["sessions_left_estimate"]) == ("finished", 200, 0)


def test_session_limit_given_overrides_observed(tmp_path):
    store = open_store(str(tmp_path / "store"))
    _paused_run(store)
    # 0.5 steps/s x 5/6 training share x 480 s = 200 steps a session: one more session
    assert collect_status(store, RUN, session_limit_s=480)["sessions_left_estimate"] == 1


def test_missing_run_exits_2_naming_run_and_store(tmp_path, capsys):
    uri = str(tmp_path / "empty-store")
    assert status_main(uri, "nope", as_json=True, plot=None) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "empty-store" in err


def test_json_and_plot(tmp_path, capsys):
    uri = str(tmp_path / "store")
    _paused_run(open_store(uri))
    png = tmp_path / "plots" / "loss.png"
    assert status_main(uri, RUN, as_json=True, plot=png) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("run", "state", "step", "total_steps", "epoch", "samples_seen", "tokens_seen",
                "checkpoint", "lease", "sessions", "loss"):
        assert key in out
    for key in ("holder", "host", "gpu", "expires_at", "live"):
        assert key in out["lease"]
    # Records from before the padding-free layout read as what they ran: padded SDPA.
    assert [(s["attention"], s["padding_free"]) for s in out["sessions"]] == [("sdpa", False)] * 2
    assert out["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_human_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # a notebook cell's width
    uri = str(tmp_path / "store")
    _paused_run(open_store(uri))
    assert status_main(uri, RUN, as_json=False, plot=None) == 0
    out = capsys.readouterr().out
    assert "paused" in out and "100 / 200 (50.0%)" in out and "00000100-g2" in out
    assert "host-s2 Tesla T4" in out and "50->100" in out
    assert "sdpa padded" in out  # the attention path, under precision and kernels
    assert max(len(line) for line in out.splitlines()) <= 80


def test_corrupt_head_exits_2(tmp_path, capsys):
    uri = str(tmp_path / "store")
    store = open_store(uri)
    _paused_run(store)
    store.write(f"{RUN}/HEAD.json", b"{not json")
    assert status_main(uri, RUN, as_json=True, plot=None) == 2
    assert "HEAD.json" in capsys.readouterr().err
