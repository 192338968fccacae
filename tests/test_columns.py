"""data.columns: the file's columns mapped to the run's fields, alpaca and ShareGPT records
recognised, bad mappings refused with the columns there are; each shape trains at engine level."""

from __future__ import annotations

import csv
import json
import math

import pytest
from pydantic import ValidationError

from baton.state_schema import RunConfig
from tests.fixtures_tiny import make_spec, make_trainer
from baton.training.columns import ALPACA, load_records, map_records, normalise_turns, resolve_columns
from baton.training.data import DataError, fingerprint, read_records
from baton.training.encode import IGNORE


def alpaca_records(n: int = 16) -> list[dict]:
    return [{"instruction": f"Add {i} to x.", "input": "" if i % 2 else f"x = {i}",
             "output": f"x + {i}"} for i in range(n)]


def sharegpt_records(n: int = 12) -> list[dict]:
    return [{"id": str(i), "conversations": [
        {"from": "system", "value": "You write Python."},
        {"from": "human", "value": f"double {i}"},
        {"from": "gpt", "value": f"{i} * 2"}]} for i in range(n)]


def quotes_csv(path, n: int = 24):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["quote", "author", "tags"])
        writer.writeheader()
        for i in range(n):
            writer.writerow({"quote": f"Quote number {i}: be kind to the loss.",
                             "author": f"A{i}", "tags": "x"})
    return path


def write_json_array(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def config(train, **data) -> RunConfig:
    return RunConfig(run="c", store="/tmp/none", model={"name": "m"},
                     data={"train": str(train), **data})


# -- mapping -----------------------------------------------------------------------------------

def test_text_and_pairs_mappings_and_a_template_of_several_columns():
    record = {"quote": "q", "instruction": "Do it.", "input": "ctx", "output": "done"}
    assert resolve_columns(record, {"text": "quote"}, "auto", source="f") == (
        "text", {"text": "quote"})
    fmt, cols = resolve_columns(record, {"prompt": "{instruction}\n\n{input}",
                                         "completion": "output"}, "auto", source="f")
    assert fmt == "pairs"
    assert map_records([record, {**record, "input": ""}], cols, fmt, source="f") == [
        {"prompt": "Do it.\n\nctx", "completion": "done"},
        {"prompt": "Do it.", "completion": "done"}]  # an empty input leaves no blank lines


def test_alpaca_and_sharegpt_are_recognised_unaided():
    assert resolve_columns(alpaca_records(1)[0], {}, "auto", source="f") == ("pairs", ALPACA)
    no_input = {"instruction": "Say hi.", "output": "hi"}
    fmt, cols = resolve_columns(no_input, {}, "auto", source="f")
    assert map_records([no_input], cols, fmt, source="f") == [
        {"prompt": "Say hi.", "completion": "hi"}]
    record = sharegpt_records(1)[0]
    fmt, cols = resolve_columns(record, {}, "auto", source="f")
    assert (fmt, cols) == ("chat", {"messages": "conversations"})
    assert map_records([record], cols, fmt, source="f")[0]["messages"] == [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "double 0"}, {"role": "assistant", "content": "0 * 2"}]
    # Native records keep reading as before: no mapping, same fields.
    assert resolve_columns({"prompt": "a", "completion": "b"}, {}, "auto", source="f") == (
        "pairs", {})


def test_turns_are_normalised_from_a_csv_cell_and_from_other_role_names():
    cell = json.dumps([{"from": "HUMAN", "value": "hi"}, {"from": "chatgpt", "value": "yo"}])
    assert normalise_turns(cell, "f", 1) == [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yo"}]
    with pytest.raises(DataError, match="role/content"):
        normalise_turns([{"speaker": "x"}], "f", 3)


def test_classification_fields_pass_through_the_mapping():
    record = {"complaint": "late", "second": "again", "issue": "billing", "id": 4}
    fmt, cols = resolve_columns(record, {"text": "complaint", "label": "issue",
                                         "text_pair": "second"}, "auto", "classification",
                                source="f")
    assert map_records([record], cols, fmt, "classification", source="f") == [
        {"text": "late", "text_pair": "again", "label": "billing"}]
    # text_pair is optional; the mapped record has exactly the run's fields.
    assert map_records([{"text": "a", "label": 1, "x": 0}], {}, "text", "classification",
                       source="f") == [{"text": "a", "label": 1}]


@pytest.mark.parametrize("columns,missing", [
    ({"text": "quote"}, "'quote'"),
    ({"prompt": "{instruction}\n\n{context}", "completion": "output"}, "'context'"),
    ({"prompt": "instruction", "completion": "answer"}, "'answer'"),
])
def test_a_bad_mapping_names_the_column_and_the_columns_there_are(tmp_path, columns, missing):
    path = write_json_array(tmp_path / "a.json", alpaca_records(4))
    with pytest.raises(DataError) as err:
        resolve_columns(read_records(path)[0], columns, "auto", source=path)
    assert missing in str(err.value) and "instruction, output" in str(err.value).replace(
        "input, ", "")


def test_a_record_further_down_that_lacks_a_column_is_named(tmp_path):
    rows = alpaca_records(5)
    del rows[3]["output"]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, cols = resolve_columns(rows[0], {}, "auto", source=path)
    with pytest.raises(DataError, match="record 4 has no column 'output'"):
        load_records(path, cols, fmt)


def test_config_accepts_the_run_fields_and_refuses_other_keys():
    assert config("d.csv", columns={"text": "quote"}).data.columns == {"text": "quote"}
    with pytest.raises(ValidationError, match=r"\{prompt, completion\}"):
        config("d.csv", columns={"label": "issue"})  # a classification field, causal-LM run
    with pytest.raises(ValidationError, match=r"data.format 'text'"):
        config("d.csv", format="text", columns={"prompt": "q"})
    with pytest.raises(ValidationError, match="hf://datasets/OWNER/NAME"):
        config("d.csv", split="test")
    assert config("hf://datasets/o/n@refs/convert/parquet", subset="en").data.hub == (
        "o/n", "refs/convert/parquet")
    with pytest.raises(ValidationError, match="not a Hub dataset URI"):
        config("hf://o/n")


def test_a_json_array_and_a_folder_of_shards_read_in_name_order(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    write_json_array(folder / "1-b.json", alpaca_records(3)[1:])
    (folder / "0-a.jsonl").write_text(json.dumps(alpaca_records(1)[0]) + "\n")
    assert read_records(folder) == alpaca_records(3)
    # One shard pins like a file; several by the sha256 of theirs, in order.
    import hashlib
    shas = [fingerprint(p) for p in sorted(folder.iterdir())]
    assert fingerprint(folder) == hashlib.sha256("\n".join(shas).encode()).hexdigest()


# -- each shape trains through the engine --------------------------------------------------

def spec_for(tmp_path, model_dir, train, **data):
    """The spec a session would create from this data config, as `agent.py run` does."""
    from baton.session.spec import inspect_data

    found = inspect_data(config(train, **data))
    spec = make_spec(model_dir, train, fmt=found["format"], max_steps=2, eval_=0.0)
    spec.data.columns = found["columns"]
    return spec


@pytest.mark.parametrize("shape", ["csv", "alpaca", "sharegpt"])
def test_each_shape_trains_two_steps(tmp_path, tiny_model_dir, shape):
    if shape == "csv":
        train, data = quotes_csv(tmp_path / "quotes.csv"), {"columns": {"text": "quote"}}
        taught = "Quote number"
    elif shape == "alpaca":
        train, data = write_json_array(tmp_path / "alpaca.json", alpaca_records()), {}
        taught = "x +"
    else:
        train, data = write_json_array(tmp_path / "sharegpt.json", sharegpt_records()), {}
        taught = "* 2"
    spec = spec_for(tmp_path, tiny_model_dir, train, **data)
    trainer = make_trainer(spec, train)
    sample = trainer.data.sample(0)
    learned = trainer.data.encoder.tok.decode([t for t in sample.labels if t != IGNORE])
    assert taught in learned  # the mapped field is what carries the loss
    losses = [trainer.train_step().loss for _ in range(2)]
    assert trainer.cursor.step == 2 and all(math.isfinite(x) and x > 0 for x in losses)


def test_agent_refuses_a_bad_mapping_with_nothing_written(tmp_path, tiny_model_dir):
    """Through `agent.py run`: the column named is not in the file -> exit 2, the message
    names it and lists the file's columns, and the store stays empty."""
    from tests.agent_helpers import run_agent, write_config

    train = quotes_csv(tmp_path / "quotes.csv", n=6)
    cfg = write_config(tmp_path, model_dir=tiny_model_dir,
                       train_file=train, store=str(tmp_path / "store"),
                       data={"columns": {"text": "quotation"}})
    done = run_agent(cfg, workdir=tmp_path / "work", timeout=240)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'quotation'" in done.stderr and "author, quote, tags" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
