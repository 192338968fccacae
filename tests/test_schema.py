"""State schema: round trips, versions, upgrades and config validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import baton.state_schema as ss
from baton.state_schema.versioning import SchemaError


def test_every_document_round_trips():
    docs = [
        ss.Cursor(step=3, total_steps=10, rng={"torch": "AAEC"}, losses=[(1, 2.5)]),
        ss.Head(checkpoint="00000003-g1", step=3, generation=1),
        ss.Lease(holder="a", host="h", generation=2, expires_at=ss.utcnow()),
        ss.Manifest(checkpoint="c", step=1, generation=1,
                    files={"a": ss.FileEntry(sha256="0" * 64, size=3)}),
        ss.SessionRecord(session_id="s", host="h", start_step=2, end_step=5, tokens=30,
                         train_seconds=3.0),
    ]
    for doc in docs:
        again = type(doc).from_json(doc.to_json())
        assert again == doc
        assert again.schema_version == ss.SCHEMA_VERSION


def test_newer_major_is_refused_with_a_fix():
    with pytest.raises(ss.NewerSchemaError, match="upgrade Baton"):
        ss.Head.from_json(b'{"schema_version": "2.0", "step": 1}', source="HEAD.json")


def test_newer_minor_is_read_and_unknown_fields_ignored():
    head = ss.Head.from_json(b'{"schema_version": "1.7", "step": 4, "future_field": true}')
    assert head.step == 4


def test_older_major_is_upgraded(monkeypatch):
    def from_v0(doc):
        doc["step"] = doc.pop("global_step")
        return doc

    monkeypatch.setitem(ss.UPGRADES, ("Head", 0), from_v0)
    head = ss.Head.from_json(b'{"schema_version": "0.3", "global_step": 9}')
    assert head.step == 9 and head.schema_version == "1.0"


def test_older_major_without_upgrade_is_an_error():
    with pytest.raises(SchemaError, match="no upgrade"):
        ss.Head.from_json(b'{"schema_version": "0.1"}')


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"step": "many"}'])
def test_corrupt_documents_raise_schema_error(raw):
    with pytest.raises(SchemaError, match="HEAD.json"):
        ss.Head.from_json(raw, source="HEAD.json")


def _config(**over):
    cfg = {"run": "r1", "store": "/tmp/s", "model": {"name": "m"}, "data": {"train": "d.jsonl"}}
    cfg.update(over)
    return cfg


def test_config_defaults_and_durations():
    cfg = ss.RunConfig.model_validate(_config())
    assert cfg.train.epochs == 3 and cfg.lora.target_modules == "all-linear"
    assert ss.parse_duration("90s") == 90 and ss.parse_duration("30m") == 1800
    assert ss.parse_duration("12h") == 43200 and ss.parse_duration(5) == 5.0


@pytest.mark.parametrize("over, needle", [
    ({"trian": {}}, "trian"),
    ({"lora": {"rank": 8}}, "rank"),
    ({"run": "../x"}, "run name"),
    ({"train": {"batch_size": 6, "micro_batch_size": 4}}, "multiple"),
    ({"checkpoint": {"every": "soon"}}, "duration"),
    ({"data": {"train": "d.jsonl", "eval": 1.5}}, "fraction"),
])
def test_config_errors_name_the_problem(over, needle):
    with pytest.raises(ValidationError, match=needle):
        ss.RunConfig.model_validate(_config(**over))
