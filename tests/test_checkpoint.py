"""Checkpoint commit, verified pull with fallback, fencing and retention on every backend; and
the RunStore documents they rest on. Files are small: the order of writes is under test, not
the transfer of large objects (the conformance suite covers that)."""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest

from baton.handoff import ConflictError, CorruptCheckpointError, FencedError, open_store
from baton.handoff.checkpoint import checkpoint_id, commit_checkpoint, pull_checkpoint
from baton.handoff.lease import LeaseLostError, LeaseManager
from baton.handoff.runstore import RunStore, parse_checkpoint_id
from baton.state_schema import SessionRecord, utcnow
from baton.state_schema import DataSpec, LoraConfig, ModelConfig, RunSpec, TrainSpec
from tests.store_helpers import make_checkpoint


@pytest.fixture
def runstore(store):
    return RunStore(store, "ckpt-run")


def digest_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def commit(runstore, tmp_path, step, generation=1, **kw) -> tuple[str, dict[str, str]]:
    folder = make_checkpoint(tmp_path / f"local-{step}-{generation}", step)
    cid = commit_checkpoint(runstore, folder, step=step, generation=generation, **kw)
    return cid, digest_tree(folder)


def test_checkpoint_id_sorts_by_step_then_generation():
    assert checkpoint_id(120, 3) == "00000120-g3"
    assert parse_checkpoint_id("00000120-g3") == (120, 3)
    with pytest.raises(ValueError):
        parse_checkpoint_id("latest")


def test_commit_then_pull_round_trip(runstore, tmp_path):
    cid, files = commit(runstore, tmp_path, 10)
    head, _ = runstore.read_head()
    assert (head.checkpoint, head.previous, head.step, head.generation) == (cid, None, 10, 1)
    manifest = runstore.read_manifest(cid)
    assert set(manifest.files) == set(files)
    assert all(manifest.files[n].sha256 == files[n] for n in files)
    ref = pull_checkpoint(runstore, tmp_path / "pulled")
    assert (ref.id, ref.step, ref.fell_back, ref.previous_bad) == (cid, 10, False, None)
    assert digest_tree(ref.path) == files


def test_second_commit_chains_previous(runstore, tmp_path):
    first, _ = commit(runstore, tmp_path, 10)
    second, files = commit(runstore, tmp_path, 20, finished=True)
    head, _ = runstore.read_head()
    assert (head.checkpoint, head.previous, head.finished) == (second, first, True)
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == files


def test_pull_of_run_without_checkpoint_is_none(runstore, tmp_path):
    assert pull_checkpoint(runstore, tmp_path / "p") is None
    LeaseManager(runstore).acquire()  # HEAD exists now, naming no checkpoint
    assert pull_checkpoint(runstore, tmp_path / "p") is None


def test_recommit_of_head_only_marks_finished(runstore, tmp_path):
    cid, files = commit(runstore, tmp_path, 10)
    again = commit_checkpoint(runstore, make_checkpoint(tmp_path / "again", 10), step=10,
                              generation=1, finished=True)
    head, _ = runstore.read_head()
    assert again == cid and head.finished and head.previous is None
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == files


def test_fencing_before_and_after_successor_commits(runstore, tmp_path):
    a = LeaseManager(runstore, holder="a", ttl=60)
    assert a.acquire().generation == 1
    base, base_files = commit(runstore, tmp_path, 10, generation=1)
    b = LeaseManager(runstore, holder="b", ttl=60)
    assert b.acquire(takeover=True).generation == 2
    before = runstore.read_head()
    with pytest.raises(FencedError, match="generation 2"):  # B has not committed yet
        commit(runstore, tmp_path, 20, generation=1)
    assert runstore.read_head() == before
    assert runstore.list_checkpoints() == [base]  # A's refused upload left nothing behind
    successor, files = commit(runstore, tmp_path, 15, generation=2)
    after = runstore.read_head()
    with pytest.raises(FencedError):
        commit(runstore, tmp_path, 30, generation=1)
    assert runstore.read_head() == after and after[0].checkpoint == successor
    with pytest.raises(LeaseLostError):
        a.renew()
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == files
    assert base_files != files


def test_cut_upload_is_never_named_and_pull_uses_last_good(runstore, tmp_path):
    good, files = commit(runstore, tmp_path, 10)
    folder = make_checkpoint(tmp_path / "cut", 20)
    cut = checkpoint_id(20, 1)
    runstore.store.upload(runstore.checkpoint_key(cut, "adapter_model.safetensors"),
                          folder / "adapter_model.safetensors")  # then the VM died
    assert cut in runstore.list_checkpoints()
    assert runstore.read_manifest(cut) is None
    assert runstore.read_head()[0].checkpoint == good
    ref = pull_checkpoint(runstore, tmp_path / "p")
    assert ref.id == good and not ref.fell_back
    assert digest_tree(ref.path) == files


def test_altered_file_is_detected_and_previous_used(runstore, tmp_path, caplog):
    older, older_files = commit(runstore, tmp_path, 10)
    newest, _ = commit(runstore, tmp_path, 20)
    tampered = tmp_path / "tampered"
    tampered.write_bytes(os.urandom(2052))  # same size: only the hash can tell
    runstore.store.upload(runstore.checkpoint_key(newest, "adapter_model.safetensors"), tampered)
    dest = tmp_path / "p"
    dest.mkdir()
    (dest / "stale.bin").write_bytes(b"from an earlier pull")
    with caplog.at_level(logging.WARNING, logger="baton.checkpoint"):
        ref = pull_checkpoint(runstore, dest)
    assert (ref.id, ref.step, ref.fell_back, ref.previous_bad) == (older, 10, True, newest)
    assert digest_tree(ref.path) == older_files  # and nothing stale or tampered is left
    assert any(newest in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)


def test_missing_file_and_missing_previous_fall_back_further(runstore, tmp_path, caplog):
    oldest, oldest_files = commit(runstore, tmp_path, 10, keep=5)
    middle, _ = commit(runstore, tmp_path, 20, keep=5)
    newest, _ = commit(runstore, tmp_path, 30, keep=5)
    runstore.store.delete(runstore.checkpoint_key(newest, "cursor.json"))
    runstore.store.delete(runstore.checkpoint_key(middle, "manifest.json"))
    with caplog.at_level(logging.WARNING, logger="baton.checkpoint"):
        ref = pull_checkpoint(runstore, tmp_path / "p")
    assert (ref.id, ref.fell_back, ref.previous_bad) == (oldest, True, newest)
    assert digest_tree(ref.path) == oldest_files
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "missing" in messages and "no manifest" in messages


def test_nothing_verifies_raises_corrupt(runstore, tmp_path):
    only, _ = commit(runstore, tmp_path, 10)
    short = tmp_path / "short"
    short.write_bytes(b"truncated")
    runstore.store.upload(runstore.checkpoint_key(only, "adapter_model.safetensors"), short)
    with pytest.raises(CorruptCheckpointError, match=only):
        pull_checkpoint(runstore, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_retention_keeps_last_k(runstore, tmp_path):
    ids = [commit(runstore, tmp_path, step, keep=3)[0] for step in (10, 20, 30, 40, 50)]
    assert runstore.list_checkpoints() == ids[-3:]
    head, _ = runstore.read_head()
    assert (head.checkpoint, head.previous) == (ids[-1], ids[-2])


def test_retention_never_deletes_head_or_previous(runstore, tmp_path):
    """Cut uploads with higher steps fill the newest K slots; HEAD's two must still stay."""
    first, _ = commit(runstore, tmp_path, 10, keep=2)
    second, _ = commit(runstore, tmp_path, 20, keep=2)
    orphans = [checkpoint_id(step, 1) for step in (500, 600)]
    for cid in orphans:
        runstore.store.upload(runstore.checkpoint_key(cid, "cursor.json"),
                              make_checkpoint(tmp_path / cid, 1) / "cursor.json")
    third, files = commit(runstore, tmp_path, 30, keep=2)
    assert runstore.list_checkpoints() == [second, third, *orphans]
    assert first not in runstore.list_checkpoints()
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == files


def test_commit_of_empty_folder_is_refused(runstore, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        commit_checkpoint(runstore, tmp_path / "empty", step=1, generation=1)
    assert runstore.read_head() is None


# -- RunStore documents ---------------------------------------------------------------------

def spec(run: str) -> RunSpec:
    return RunSpec(
        run=run, model=ModelConfig(name="tiny"), lora=LoraConfig(),
        data=DataSpec(source="train.jsonl", key=f"{run}/data/{'0' * 64}.jsonl", sha256="0" * 64,
                      format="text", eval=0.05, max_seq_len=64, packing=False),
        train=TrainSpec(max_steps=10, batch_size=8, lr=1e-4, schedule="linear", warmup=0.0,
                        optimizer="adamw", max_grad_norm=1.0, weight_decay=0.0, seed=1))


def test_spec_is_written_once(runstore):
    assert runstore.read_spec() is None
    runstore.create_spec(spec("ckpt-run"))
    with pytest.raises(ConflictError, match="already exists"):
        runstore.create_spec(spec("ckpt-run"))
    assert runstore.read_spec().train.max_steps == 10


def test_sessions_sorted_by_start(runstore):
    t0 = utcnow()
    for i, offset in enumerate([30, 10, 20]):
        runstore.write_session(SessionRecord(session_id=f"s{i}", host="h",
                                             started=t0 + timedelta(seconds=offset)))
    runstore.store.write(runstore.key("sessions", "broken.json"), b"{not json")
    assert [r.session_id for r in runstore.read_sessions()] == ["s1", "s2", "s0"]


def test_upload_data_once_under_its_hash(runstore, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    key = runstore.upload_data(data, sha, ".jsonl")
    assert key == f"ckpt-run/data/{sha}.jsonl"
    assert runstore.upload_data(data, sha, "jsonl") == key
    assert runstore.store.read(key).data == data.read_bytes()
    with pytest.raises(ValueError):
        runstore.upload_data(data, "not-a-hash", "jsonl")


def test_list_checkpoints_orders_generations_numerically(runstore, tmp_path):
    src = make_checkpoint(tmp_path / "src", 1) / "cursor.json"
    for cid in ["00000010-g10", "00000010-g9", "00000002-g11"]:
        runstore.store.upload(runstore.checkpoint_key(cid, "cursor.json"), src)
    runstore.store.upload(runstore.key("checkpoints", "README.txt"), src)
    assert runstore.list_checkpoints() == ["00000002-g11", "00000010-g9", "00000010-g10"]


def test_bad_run_name_is_refused(store):
    with pytest.raises(ValueError, match="run name"):
        RunStore(store, "../escape")


def test_commit_whose_answer_was_lost_keeps_previous(runstore, tmp_path):
    """HEAD moved but the backend reported a conflict: the re-read shows our checkpoint, so
    the commit succeeds without a second HEAD move (which would make it its own previous)."""
    first, _ = commit(runstore, tmp_path, 10)
    real_publish = runstore.store.publish

    def publish_then_lose_answer(files, key, data, *, expect):
        real_publish(files, key, data, expect=expect)
        raise ConflictError(f"{key} changed since it was read")

    runstore.store.publish = publish_then_lose_answer
    second, files = commit(runstore, tmp_path, 20)
    head, _ = runstore.read_head()
    assert (head.checkpoint, head.previous) == (second, first)
    assert digest_tree(pull_checkpoint(runstore, tmp_path / "p").path) == files


def test_takeover_between_fence_check_and_head_move_is_fenced(store_uri, runstore, tmp_path):
    """B takes over while A hashes and uploads: A's commit re-reads HEAD before moving it and
    must see B's generation there, not use B's HEAD as the condition for its own write."""
    LeaseManager(runstore, holder="a").acquire()
    base, _ = commit(runstore, tmp_path, 10)
    successor = RunStore(open_store(store_uri), runstore.run)
    real_read_head, reads = runstore.read_head, []

    def read_head_then_takeover():
        reads.append(1)
        if len(reads) == 2:  # the first read passed the fence check; now B arrives
            LeaseManager(successor, holder="b").acquire(takeover=True)
        return real_read_head()

    runstore.read_head = read_head_then_takeover
    with pytest.raises(FencedError):
        commit(runstore, tmp_path, 20)
    head, _ = real_read_head()
    assert (head.generation, head.checkpoint) == (2, base)
    assert successor.list_checkpoints() == [base]
    successor.store.close()
