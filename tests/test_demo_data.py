"""The demo dataset: real stdlib docstring -> function pairs, the same bytes every time."""

from __future__ import annotations

import ast
import json

from baton.scripts.demo_data import build_pairs, main, write_jsonl
from baton.training.data import detect_format, read_records


def test_pairs_are_real_functions_without_their_docstring():
    pairs = build_pairs(count=60)
    assert len(pairs) == 60
    for record in pairs:
        assert set(record) == {"prompt", "completion"}
        tree = ast.parse(record["completion"])  # the completion is valid Python on its own
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert f"`{fn.name}`" in record["prompt"]
        assert ast.get_docstring(fn) is None
        doc = record["prompt"].split("Its docstring says:\n", 1)[1].strip()
        assert doc and doc not in record["completion"]


def test_deterministic_and_readable_by_training_data(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", count=120)
    b = write_jsonl(tmp_path / "b.jsonl", count=120)
    assert a.read_bytes() == b.read_bytes()
    records = read_records(a)
    assert len(records) == 120 and detect_format(a) == "pairs"
    assert len({r["prompt"] for r in records}) > 100  # varied, not one function repeated


def test_cli_writes_the_count(tmp_path, capsys):
    out = tmp_path / "d" / "demo.jsonl"
    assert main([str(out), "--count", "25"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 25 and all(json.loads(line)["completion"] for line in lines)
    assert "25 records" in capsys.readouterr().out
