"""One conformance suite, run against every backend (in the manner of fsspec's tests/abstract).

A backend is correct when it passes all of these; the lease and checkpoint code rely on nothing
else."""

from __future__ import annotations

import hashlib
import os

import pytest

from baton.handoff import ABSENT, ConflictError, NotFoundError


def test_write_read_round_trip(store):
    version = store.write("run/a.json", b'{"x": 1}')
    got = store.read("run/a.json")
    assert got.data == b'{"x": 1}'
    assert got.version == version


def test_read_missing_raises_not_found(store):
    with pytest.raises(NotFoundError):
        store.read("run/missing.json")
    assert store.read_optional("run/missing.json") is None


def test_create_if_absent(store):
    store.write("run/spec.json", b"one", expect=ABSENT)
    with pytest.raises(ConflictError):
        store.write("run/spec.json", b"two", expect=ABSENT)
    assert store.read("run/spec.json").data == b"one"


def test_update_if_version(store):
    v1 = store.write("run/HEAD.json", b"v1", expect=ABSENT)
    v2 = store.write("run/HEAD.json", b"v2", expect=v1)
    assert v2 != v1
    with pytest.raises(ConflictError):
        store.write("run/HEAD.json", b"stale", expect=v1)
    assert store.read("run/HEAD.json").data == b"v2"
    assert store.read("run/HEAD.json").version == v2


def test_update_if_version_of_missing_object_conflicts(store):
    with pytest.raises(ConflictError):
        store.write("run/never.json", b"x", expect="0" * 32)
    assert store.read_optional("run/never.json") is None


def test_race_has_one_winner(store):
    """Two writers read the same version; exactly one replaces it."""
    v = store.write("run/lease.json", b"base", expect=ABSENT)
    store.write("run/lease.json", b"first", expect=v)
    with pytest.raises(ConflictError):
        store.write("run/lease.json", b"second", expect=v)
    assert store.read("run/lease.json").data == b"first"


def test_unrelated_change_does_not_break_condition(store):
    """A conditional write depends on its own key only, even where the backend versions the
    whole repository (the Hub)."""
    v = store.write("run/HEAD.json", b"h1", expect=ABSENT)
    store.write("run/sessions/s1.json", b"other")
    store.write("run/HEAD.json", b"h2", expect=v)
    assert store.read("run/HEAD.json").data == b"h2"


def test_upload_download_file(store, tmp_path):
    src = tmp_path / "adapter.bin"
    src.write_bytes(os.urandom(300_000))
    store.upload("run/checkpoints/00000001-g1/adapter.bin", src)
    dst = tmp_path / "out" / "adapter.bin"
    store.download("run/checkpoints/00000001-g1/adapter.bin", dst)
    assert dst.read_bytes() == src.read_bytes()


def test_download_missing_raises_and_writes_nothing(store, tmp_path):
    dst = tmp_path / "nothing.bin"
    with pytest.raises(NotFoundError):
        store.download("run/none.bin", dst)
    assert not dst.exists()


def test_list_is_sorted_and_scoped(store):
    for key in ["run/b/2.json", "run/a/1.json", "run/a/3.json", "other/x.json"]:
        store.write(key, b"x")
    assert store.list("run/a/") == ["run/a/1.json", "run/a/3.json"]
    assert store.list("run/") == ["run/a/1.json", "run/a/3.json", "run/b/2.json"]
    assert store.list("nothing/") == []


def test_delete(store):
    store.write("run/x.json", b"x")
    store.delete("run/x.json")
    assert store.read_optional("run/x.json") is None
    store.delete("run/x.json")  # absent is fine
    store.write("run/x.json", b"again", expect=ABSENT)


def test_publish_files_and_pointer(store, tmp_path):
    files = {}
    for name in ["a.bin", "manifest.json"]:
        p = tmp_path / name
        p.write_bytes(name.encode() * 10)
        files[f"run/checkpoints/c1/{name}"] = p
    v = store.publish(files, "run/HEAD.json", b"c1", expect=ABSENT)
    assert store.read("run/HEAD.json").version == v
    assert store.list("run/checkpoints/c1/") == sorted(files)
    with pytest.raises(ConflictError):
        store.publish({}, "run/HEAD.json", b"c2", expect=ABSENT)
    assert store.read("run/HEAD.json").data == b"c1"


@pytest.mark.parametrize("key", ["../escape.json", "/abs.json", "run//x", "run/../x", ""])
def test_bad_keys_refused(store, key):
    with pytest.raises(ValueError):
        store.write(key, b"x")


@pytest.mark.slow
def test_large_file_round_trip(store, tmp_path):
    """64 MiB: through S3 this takes the multipart path."""
    src = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with open(src, "wb") as fh:
        for i in range(64):
            fh.write(block[i:] + block[:i])
    store.upload("run/big.bin", src)
    dst = tmp_path / "big.out"
    store.download("run/big.bin", dst)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert dst.stat().st_size == 64 << 20
    assert digest(dst) == digest(src)
