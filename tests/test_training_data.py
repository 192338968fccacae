"""Data files, formats, masking, packing, order, and the errors a user sees."""

from __future__ import annotations

import csv
import json

import pytest

from tests.fixtures_tiny import chat_records, make_spec, pairs_records, text_records, write_jsonl
from baton.training.data import (DataChangedError, DataError, count_samples, detect_format,
                           fingerprint, read_records)
from baton.training.encode import IGNORE, Encoder, collate, pack
from baton.training.order import epoch_permutation, split_eval, step_indices


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_fingerprint_is_sha256_of_bytes(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "a.jsonl", text_records(3))
    assert fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("records,fmt", [(text_records(3), "text"), (pairs_records(3), "pairs"),
                                         (chat_records(3), "chat")])
def test_detect_format_and_count(tmp_path, records, fmt):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert detect_format(path) == fmt
    assert count_samples(path) == 3


def test_csv_pairs_and_chat(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(pairs_records(5))
    assert detect_format(path) == "pairs" and count_samples(path) == 5
    chat = tmp_path / "c.csv"
    with open(chat, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["messages"])
        writer.writeheader()
        writer.writerows({"messages": json.dumps(r["messages"])} for r in chat_records(2))
    assert detect_format(chat) == "chat"
    assert read_records(chat)[0]["messages"][2]["role"] == "assistant"


def test_missing_empty_unknown_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        detect_format(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        count_samples(tmp_path / "empty.jsonl")
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match="'text' column"):
        detect_format(tmp_path / "odd.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        count_samples(tmp_path / "bad.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=".jsonl, .csv and .parquet"):
        count_samples(tmp_path / "d.txt")


def test_changed_data_is_refused_before_the_model_loads(tmp_path, tiny_model_dir):
    from tests.fixtures_tiny import make_trainer

    data = write_jsonl(tmp_path / "train.jsonl", pairs_records())
    spec = make_spec(tiny_model_dir, data, max_steps=2)
    write_jsonl(data, pairs_records(25))  # the same path, other bytes
    with pytest.raises(DataChangedError, match="start a new run") as info:
        make_trainer(spec, data, micro=1)
    assert isinstance(info.value, DataError)


def test_format_mismatch_names_the_record(tmp_path, tiny_model_dir):
    from baton.training.dataset import RunData

    data = write_jsonl(tmp_path / "train.jsonl", pairs_records(3) + text_records(1))
    spec = make_spec(tiny_model_dir, data, max_steps=2)
    with pytest.raises(DataError, match="record 4"):
        RunData(spec, data)


def test_pairs_mask_the_prompt(tokenizer):
    enc = Encoder(tokenizer, "pairs", 64)(pairs_records(2)[1])
    prompt = tokenizer("def f1(x):\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[: len(prompt)] == prompt  # this tokenizer adds no bos
    assert enc.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert enc.labels[len(prompt):] == enc.input_ids[len(prompt):]
    assert tokenizer.decode(enc.labels[len(prompt):]) == "    return x - 1\n</s>"
    assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_chat_trains_only_on_assistant_turns(tokenizer):
    enc = Encoder(tokenizer, "chat", 256)(chat_records(1)[0])
    learned = tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert learned.replace("</s>", "|").replace("\n", "") == "x + 0|x + 1|"
    assert "add 0" not in learned and "You write" not in learned


def test_text_truncation_and_packing(tokenizer):
    enc = Encoder(tokenizer, "text", 8)(text_records(1)[0])
    assert len(enc.input_ids) == 8 and enc.labels == enc.input_ids
    full = [Encoder(tokenizer, "text", 512)(r) for r in text_records(4)]
    blocks = pack(full, 64)
    assert [t for b in blocks for t in b.input_ids] == [t for s in full for t in s.input_ids]
    assert all(len(b.input_ids) <= 64 for b in blocks) and len(blocks) < len(full)


def test_collate_pads_right_and_ignores_padding(tokenizer):
    encoder = Encoder(tokenizer, "pairs", 64)
    batch = collate([encoder(r) for r in pairs_records(3)], tokenizer.pad_token_id)
    short = batch["attention_mask"].sum(1).argmin()
    assert (batch["labels"][short][batch["attention_mask"][short] == 0] == IGNORE).all()


def test_epoch_order_is_seeded_and_resumable_in_o1():
    assert epoch_permutation(7, 0, 21) == epoch_permutation(7, 0, 21)
    assert epoch_permutation(7, 0, 21) != epoch_permutation(7, 1, 21)
    assert sorted(epoch_permutation(7, 3, 21)) == list(range(21))
    stream = step_indices(7, 21, 0, 0, 50)
    # Starting anywhere from (epoch, position) gives the same continuation.
    for cut in (5, 20, 21, 37):
        _, epoch, position = stream[cut - 1]
        assert step_indices(7, 21, epoch, position, 50 - cut) == stream[cut:]


def test_eval_split_is_deterministic_and_disjoint():
    train, held = split_eval(40, 0.1, seed=3)
    assert (train, held) == split_eval(40, 0.1, seed=3)
    assert len(held) == 4 and not set(train) & set(held) and len(train) + len(held) == 40
    assert split_eval(40, 0.1, seed=4)[1] != held
    assert split_eval(40, None, seed=3) == (list(range(40)), [])


def test_eval_from_a_separate_file(tmp_path, tiny_model_dir):
    from baton.training.dataset import RunData

    data = write_jsonl(tmp_path / "train.jsonl", pairs_records(10))
    held = write_jsonl(tmp_path / "eval.jsonl", pairs_records(3))
    spec = make_spec(tiny_model_dir, data, max_steps=2, eval_="eval.jsonl",
                     eval_sha=fingerprint(held))
    run = RunData(spec, data, held)
    assert len(run.train_records) == 10 and len(run.eval_records) == 3
    with pytest.raises(DataError, match="eval_path"):
        RunData(spec, data)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="install pyarrow"):
            count_samples(tmp_path / "d.parquet")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(pairs_records(4)), tmp_path / "d.parquet")
    assert detect_format(tmp_path / "d.parquet") == "pairs"


def test_chat_without_assistant_turn_is_refused(tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match="no assistant turn"):
        Encoder(tokenizer, "chat", 64)(record)
