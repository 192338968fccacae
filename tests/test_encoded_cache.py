"""The encoded-data cache: a run tokenizes and packs once; later sessions load the result.

Engine-level tests with the tiny model's tokenizer and the real local store (no model load):
the cached samples equal the uncached ones exactly (split, packing, eval file), a later session
reads and tokenizes no record, the key follows every input that changes the encoding, and a
corrupt or missing cache is rebuilt, never trusted. One test stores it on the Hub double, where
the file and its manifest are one commit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from baton.handoff import open_store
from baton.handoff.runstore import RunStore
from baton.session.datacache import StoreEncodedCache
from tests.fixtures_tiny import chat_records, make_spec, pairs_records, write_jsonl
from baton.training import dataset
from baton.training.data import fingerprint
from baton.training.dataset import RunData
from baton.training.encode import Encoder
from baton.training.encoded import (EncodedSet, cache_key, read_encoded, tokenizer_fingerprint,
                              tokenizer_folder)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def varied_chat(n: int) -> list[dict]:
    """Conversations of different lengths, so packing makes blocks of different sizes."""
    return [{"messages": [
        {"role": "user", "content": "add " + "one " * (i % 5)},
        {"role": "assistant", "content": f"x + {i}" + " y" * (i % 7)},
    ]} for i in range(n)]


def cache_in(store_dir: Path, workdir: Path, said: list | None = None) -> StoreEncodedCache:
    said = [] if said is None else said
    return StoreEncodedCache(RunStore(open_store(str(store_dir)), "tiny"), workdir, said.append)


def same_samples(a: RunData, b: RunData) -> None:
    assert a.n_train == b.n_train
    assert [a.sample(i) for i in range(a.n_train)] == [b.sample(i) for i in range(b.n_train)]
    assert a.eval_samples() == b.eval_samples()


@pytest.mark.parametrize("packing", [False, True])
def test_cached_samples_equal_uncached_and_a_later_session_tokenizes_nothing(
        tiny_model_dir, tokenizer, tmp_path, monkeypatch, packing):
    data = write_jsonl(tmp_path / "train.jsonl", varied_chat(40))
    spec = make_spec(tiny_model_dir, data, fmt="chat", packing=packing, max_seq_len=48,
                     eval_=0.1)
    plain = RunData(spec, data)
    plain.attach(tokenizer)
    said: list[str] = []
    first = RunData(spec, data, cache=cache_in(tmp_path / "store", tmp_path / "w1", said))
    first.attach(tokenizer)
    same_samples(plain, first)
    assert any("stored as tiny/cache/encoded/" in line for line in said), said
    if packing:
        assert plain.n_train < 36 and any(first.sample(i).position_ids.count(0) > 1
                                          for i in range(first.n_train))

    # A later session on a fresh machine: no record is read, none is tokenized.
    def forbidden(*_args, **_kwargs):
        raise AssertionError("a cached session must not read or encode records")

    monkeypatch.setattr(dataset, "load_records", forbidden)
    monkeypatch.setattr(Encoder, "__call__", forbidden)
    cache = cache_in(tmp_path / "store", tmp_path / "w2", said)
    later = RunData(spec, data, cache=cache)
    later.attach(tokenizer)
    same_samples(plain, later)
    assert (cache.hits, cache.downloads) == (1, 1)
    again = cache_in(tmp_path / "store", tmp_path / "w2")  # the same machine: no download
    RunData(spec, data, cache=again).attach(tokenizer)
    assert (again.hits, again.downloads) == (1, 0)


def test_the_capped_eval_subset_is_the_uncached_one(tiny_model_dir, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", varied_chat(40))
    spec = make_spec(tiny_model_dir, data, fmt="chat", eval_=0.25).model_copy(
        update={"eval_records": 4})
    plain = RunData(spec, data)
    plain.attach(tokenizer)
    cached = RunData(spec, data, cache=cache_in(tmp_path / "store", tmp_path / "w"))
    cached.attach(tokenizer)
    assert len(plain.eval_samples()) == 4 and len(plain.eval_records) == 10
    same_samples(plain, cached)


def test_an_eval_file_is_cached_beside_the_train_records(tiny_model_dir, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(10))
    held = write_jsonl(tmp_path / "eval.jsonl", chat_records(3))
    spec = make_spec(tiny_model_dir, data, fmt="chat", eval_=str(held),
                     eval_sha=fingerprint(held), packing=True)
    plain = RunData(spec, data, held)
    plain.attach(tokenizer)
    for workdir in ("w1", "w2"):  # built, then loaded
        cached = RunData(spec, data, held, cache=cache_in(tmp_path / "store", tmp_path / workdir))
        cached.attach(tokenizer)
        same_samples(plain, cached)
    key, path = cached.encoded_file
    sets = read_encoded(path, key)
    assert len(sets["train"]) == 10 and len(sets["eval"]) == 3


def test_flat_pack_makes_the_blocks_of_encode_pack():
    from baton.training.encode import Encoded, pack

    samples = [Encoded(list(range(100 + i, 100 + i + n)), [5] * n) for i, n in
               enumerate([3, 7, 2, 8, 8, 1, 5, 4])]
    flat = EncodedSet.from_encoded(samples).pack(8)
    assert flat.as_list() == pack(samples, 8)
    assert EncodedSet.from_encoded(samples).select([6, 0, 3]).as_list() == \
        [samples[6], samples[0], samples[3]]


def test_key_follows_every_input_of_the_encoding(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pairs_records(8))
    fp = tokenizer_fingerprint(tokenizer_folder(make_spec(tiny_model_dir, data)))
    base = cache_key(make_spec(tiny_model_dir, data), fp)
    assert base == cache_key(make_spec(tiny_model_dir, data), fp)  # canonical: stable
    for changed in (dict(max_seq_len=32), dict(packing=True), dict(fmt="text")):
        assert cache_key(make_spec(tiny_model_dir, data, **changed), fp) != base, changed
    other = write_jsonl(tmp_path / "other.jsonl", pairs_records(9))
    assert cache_key(make_spec(tiny_model_dir, other), fp) != base
    spec = make_spec(tiny_model_dir, data)
    with_task = [cache_key(SimpleNamespace(data=spec.data, task=t), fp) for t in ("sft", "dpo")]
    assert len({base, *with_task}) == 3  # a top-level task joins the key when present

    # The tokenizer by its files: a copy elsewhere is the same, one changed file is not.
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert tokenizer_fingerprint(copy) == fp
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_fingerprint(copy) != fp
    assert tokenizer_fingerprint(tmp_path) is None  # no tokenizer files: no cache


def stored_file(store_dir: Path) -> Path:
    (found,) = (store_dir / "tiny" / "cache" / "encoded").glob("*.safetensors")
    return found


@pytest.mark.parametrize("damage", ["file", "manifest", "gone", "local"])
def test_a_corrupt_or_missing_cache_is_rebuilt_never_trusted(tiny_model_dir, tokenizer,
                                                             tmp_path, damage):
    data = write_jsonl(tmp_path / "train.jsonl", varied_chat(20))
    spec = make_spec(tiny_model_dir, data, fmt="chat", packing=True)
    plain = RunData(spec, data)
    plain.attach(tokenizer)
    RunData(spec, data, cache=cache_in(tmp_path / "store", tmp_path / "w1")).attach(tokenizer)
    manifest = next((tmp_path / "store" / "tiny" / "cache" / "encoded").glob("*.json"))
    workdir = tmp_path / "w2"
    if damage == "file":  # flipped bytes in the store's copy
        blob = bytearray(stored_file(tmp_path / "store").read_bytes())
        blob[-3] ^= 0xFF
        stored_file(tmp_path / "store").write_bytes(bytes(blob))
    elif damage == "manifest":
        manifest.write_text("{not json")
    elif damage == "gone":
        stored_file(tmp_path / "store").unlink()
    else:  # the local copy of an earlier session on this machine
        workdir = tmp_path / "w1"
        local = next((workdir / "data").glob("encoded-*.safetensors"))
        local.write_bytes(local.read_bytes()[:-10])
    said: list[str] = []
    cache = cache_in(tmp_path / "store", workdir, said)
    rebuilt = RunData(spec, data, cache=cache)
    rebuilt.attach(tokenizer)
    same_samples(plain, rebuilt)
    if damage == "local":  # the store's copy is good: fetched again, nothing rebuilt
        assert (cache.hits, cache.downloads) == (1, 1)
        return
    assert cache.hits == 0 and any("not usable" in line for line in said), said
    # The rebuilt cache replaced the bad one: the next fresh machine loads it.
    check = cache_in(tmp_path / "store", tmp_path / "w3")
    RunData(spec, data, cache=check).attach(tokenizer)
    assert check.hits == 1


def test_two_machines_racing_to_store_it_keep_one_manifest(tiny_model_dir, tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", varied_chat(12))
    spec = make_spec(tiny_model_dir, data, fmt="chat")
    a, b = (cache_in(tmp_path / "store", tmp_path / w) for w in ("wa", "wb"))
    key = cache_key(spec, tokenizer_fingerprint(tokenizer_folder(spec)))
    assert a.fetch(key) is None and b.fetch(key) is None  # both miss, both encode
    for cache in (a, b):
        RunData(spec, data, cache=cache).attach(tokenizer)  # b's create-if-absent loses quietly
    manifests = list((tmp_path / "store" / "tiny" / "cache" / "encoded").glob("*.json"))
    assert len(manifests) == 1 and stored_file(tmp_path / "store").is_file()
    assert cache_in(tmp_path / "store", tmp_path / "wc").fetch(key) is not None


def test_on_the_hub_the_file_and_its_manifest_are_one_commit(tiny_model_dir, tokenizer,
                                                             tmp_path, hub_server):
    from baton.handoff.hub import HubStore

    data = write_jsonl(tmp_path / "train.jsonl", varied_chat(12))
    spec = make_spec(tiny_model_dir, data, fmt="chat", packing=True)
    plain = RunData(spec, data)
    plain.attach(tokenizer)
    uri = hub_server.new_repo_uri()
    store = HubStore(uri)
    try:
        repo = uri.removeprefix("hf://")
        store.write("tiny/spec.json", b"{}")  # the repo exists once the run does
        before = hub_server.commits(repo)
        RunData(spec, data, cache=StoreEncodedCache(RunStore(store, "tiny"), tmp_path / "w1")
                ).attach(tokenizer)
        assert hub_server.commits(repo) == before + 1
        assert len(store.list("tiny/cache/encoded/")) == 2
        later = StoreEncodedCache(RunStore(store, "tiny"), tmp_path / "w2")
        cached = RunData(spec, data, cache=later)
        cached.attach(tokenizer)
        same_samples(plain, cached)
        assert (later.hits, later.downloads) == (1, 1)
    finally:
        store.close()
