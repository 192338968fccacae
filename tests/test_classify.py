"""task: classification on the tiny models: labels, pooling, the head in the checkpoint, exact
resume, and a handoff through a store that eval.py, status, merge.py and plan then read.

Decoder: the tiny Llama as a sequence classifier in NF4 (the `score` head over the last
non-pad token). Encoder: the tiny RoBERTa-shaped encoder, unquantized (`classifier` head).
Both train through the engine in this process (no agent subprocess: the SmolLM2 test drives
the CLI); the handoff commits and pulls verified checkpoints through a real local store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_classify import classification_spec, colour_records
from tests.fixtures_classify import tiny_encoder_dir  # noqa: F401 - a fixture
from tests.fixtures_tiny import make_trainer, write_jsonl

RUN = "tiny"  # make_spec's run name


# -- labels --------------------------------------------------------------------------------

def test_labels_are_sorted_numbers_sort_as_numbers_and_strings_as_strings():
    from baton.training.classify_data import run_labels

    numbers = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 9, 2, 9, 10, 2])]
    assert run_labels(numbers, None, 1) == ["2", "9", "10"]
    words = [{"text": f"t{i}", "label": w} for i, w in enumerate(["pear", "Apple", "fig"])]
    assert run_labels(words, None, 1) == ["Apple", "fig", "pear"]


def test_an_eval_label_training_never_shows_is_refused_with_nothing_written(tmp_path,
                                                                            tiny_model_dir):
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.session.spec import SpecError, prepare_spec
    from baton.state_schema import RunConfig

    train = write_jsonl(tmp_path / "train.jsonl", colour_records(12))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a purple car", "label": "purple"}])
    config = RunConfig.model_validate({
        "run": "c", "store": str(tmp_path / "store"), "task": "classification",
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(train), "eval": str(held)}})
    with pytest.raises(SpecError, match=r"\['purple'\].*training split never shows"):
        prepare_spec(RunStore(open_store(config.store), "c"), config)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))
    # A record without its label, and packing, are refused as well.
    write_jsonl(train, colour_records(6) + [{"text": "no label here"}])
    with pytest.raises(SpecError, match="record 7 has no column 'label'"):
        prepare_spec(RunStore(open_store(config.store), "c"), config.model_copy(
            update={"data": config.data.model_copy(update={"eval": 0.2})}))
    with pytest.raises(ValueError, match="data.packing"):
        RunConfig.model_validate({**config.model_dump(), "data": {"train": str(train),
                                                                   "packing": True}})


# -- the decoder: pooling, head, exact resume ----------------------------------------------

@pytest.fixture(scope="module")
def decoder(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls-decoder")
    data = write_jsonl(folder / "train.jsonl", colour_records())
    spec = classification_spec(tiny_model_dir, data, load_in_4bit=True, max_steps=4,
                               batch_size=4, eval_=0.25)
    return spec, data, folder


def test_decoder_pools_each_row_on_its_own_last_token(decoder):
    """A padded micro-batch gives each row the logits it has alone: the pad id is on the
    config, so transformers pools the last non-pad token of each row."""
    from baton.training import classify

    spec, data, _ = decoder
    trainer = make_trainer(spec, data, micro=4, kernels="auto")
    assert type(trainer.model.get_base_model()).__name__ == "LlamaForSequenceClassification"
    assert trainer.model.config.pad_token_id == trainer.tokenizer.pad_token_id
    samples = [trainer.data.sample(i) for i in range(4)]
    assert len({len(s.input_ids) for s in samples}) > 1  # padding really happens
    together = classify.predict(trainer, samples)
    alone = torch.cat([classify.predict(trainer, [s]) for s in samples])
    assert together.shape == (4, 3)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_the_head_stays_a_plain_linear_in_a_4bit_model(decoder):
    spec, data, _ = decoder
    trainer = make_trainer(spec, data, micro=4, kernels="auto")
    head = trainer.model.base_model.model.score
    assert type(head).__name__ == "ModulesToSaveWrapper"  # PEFT's modules_to_save
    assert type(head.modules_to_save["default"]).__name__ == "Linear"  # not Linear4bit
    weight = head.modules_to_save["default"].weight
    assert weight.requires_grad and weight.dtype == torch.float32
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit"  # the rest of the base is NF4


def test_head_trains_in_full_saves_and_resumes_exactly(decoder, tmp_path):
    spec, data, _ = decoder
    spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"load_in_4bit": False})})  # the same path, faster on a CPU
    first = make_trainer(spec, data, micro=2, kernels="auto")
    head = first.model.base_model.model.score
    initial = head.modules_to_save["default"].weight.detach().clone()
    for _ in range(2):
        first.train_step()
    trained = head.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(initial, trained)  # the head moved: trained in full
    first.save(tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.score.weight"], trained)
    second = make_trainer(spec, data, micro=4, kernels="auto")  # another micro-batch size
    second.load(tmp_path / "ckpt")
    restored = second.model.base_model.model.score.modules_to_save["default"].weight
    assert torch.equal(restored, trained)
    losses = [(first.train_step().loss, second.train_step().loss) for _ in range(2)]
    assert all(a == pytest.approx(b, abs=1e-6) for a, b in losses), losses
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    left = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    right = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=1e-6, rtol=1e-5)


def test_a_checkpoint_without_its_head_is_refused(decoder, tmp_path):
    from safetensors.torch import save_file

    from baton.training.engine import CheckpointError

    spec, data, _ = decoder
    trainer = make_trainer(spec, data, micro=4, kernels="auto")
    trainer.save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "score" not in k}, str(path))
    with pytest.raises(CheckpointError, match="lacks the trained weight .*score"):
        trainer.load(tmp_path / "ckpt")


# -- the encoder: a handoff through a store, then eval.py, status, merge.py, plan -----------

def _commit(runstore, trainer, folder: Path, finished: bool = False) -> str:
    from baton.handoff.checkpoint import commit_checkpoint

    trainer.evaluate()  # as the checkpointer does before each save
    trainer.save(folder)
    return commit_checkpoint(runstore, folder, step=trainer.cursor.step, generation=1,
                             finished=finished)


@pytest.fixture(scope="module")
def encoder_run(tiny_encoder_dir, tmp_path_factory):
    """Session 1 trains 3 of 6 steps and commits; session 2 pulls the verified checkpoint
    into a fresh trainer with another micro-batch, finishes and commits."""
    from baton.handoff import open_store
    from baton.handoff.checkpoint import pull_checkpoint
    from baton.handoff.runstore import RunStore

    folder = tmp_path_factory.mktemp("cls-encoder")
    data = write_jsonl(folder / "train.jsonl", colour_records())
    spec = classification_spec(tiny_encoder_dir, data, max_steps=6, batch_size=4, eval_=0.25)
    spec.train.lr = 1e-2
    store = str(folder / "store")
    runstore = RunStore(open_store(store), RUN)
    runstore.create_spec(spec)
    runstore.upload_data(data, spec.data.sha256, "jsonl")
    first = make_trainer(spec, data, micro=2, kernels="auto")
    for _ in range(3):
        first.train_step()
    _commit(runstore, first, folder / "s1")
    ref = pull_checkpoint(runstore, folder / "pulled")
    second = make_trainer(spec, data, micro=4, kernels="auto")
    second.load(ref.path)
    assert second.cursor.step == 3
    while not second.finished:
        second.train_step()
    cid = _commit(runstore, second, folder / "s2", finished=True)
    return {"store": store, "spec": spec, "data": data, "trainer": second, "cid": cid,
            "folder": folder}


def test_encoder_head_is_the_classifier_and_eval_writes_the_metrics(encoder_run, tmp_path):
    from baton.scripts.eval import main

    trainer = encoder_run["trainer"]
    assert type(trainer.model.get_base_model()).__name__ == "RobertaForSequenceClassification"
    out = tmp_path / "eval.json"
    assert main(["--store", encoder_run["store"], "--run", RUN, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"checkpoint", "eval_records", "labels", "majority", "base", "tuned",
                           "confusion"}
    assert result["checkpoint"] == encoder_run["cid"] and result["labels"] == ["blue", "green",
                                                                               "red"]
    assert set(result["base"]) == {"accuracy", "macro_f1", "loss"}
    assert set(result["tuned"]) == {"accuracy", "macro_f1", "loss", "per_class"}
    confusion = result["confusion"]
    assert sum(map(sum, confusion)) == result["eval_records"] == 9
    assert result["tuned"]["accuracy"] == pytest.approx(
        sum(confusion[i][i] for i in range(3)) / 9)
    # The tuned numbers are the trainer's own on the same records.
    assert result["tuned"]["accuracy"] == pytest.approx(trainer.cursor.eval_accuracy)
    assert result["tuned"]["loss"] == pytest.approx(trainer.cursor.eval_loss, abs=1e-5)
    assert result["base"]["loss"] == pytest.approx(trainer.cursor.base_eval_loss, abs=1e-5)
    per = result["tuned"]["per_class"]
    assert [per[k]["support"] for k in result["labels"]] == [sum(r) for r in confusion]
    assert 0 <= result["majority"]["accuracy"] <= 1
    png = tmp_path / "eval.confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_follow_their_definitions():
    from baton.scripts.eval_classify import scores

    logits = torch.eye(3)[[0, 0, 1, 2, 2, 2]]  # predictions 0 0 1 2 2 2
    got = scores(logits, [0, 1, 1, 2, 2, 0], ["a", "b", "c"])
    assert got["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert got["accuracy"] == pytest.approx(4 / 6)
    assert got["per_class"]["a"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert got["per_class"]["b"]["precision"] == 1.0 and got["per_class"]["b"]["recall"] == 0.5
    assert got["per_class"]["c"]["f1"] == pytest.approx(0.8)
    assert got["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_status_shows_eval_accuracy(encoder_run, capsys):
    from baton.handoff import open_store
    from baton.session.status import collect_status, render

    status = collect_status(open_store(encoder_run["store"]), RUN)
    assert status["state"] == "finished" and status["step"] == 6
    assert status["eval_accuracy"] == pytest.approx(encoder_run["trainer"].cursor.eval_accuracy)
    render(status)
    assert f"accuracy {status['eval_accuracy']:.3f}" in capsys.readouterr().out


def test_merge_writes_a_plain_classifier_with_the_same_predictions(encoder_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from baton.scripts.merge import main
    from baton.training import classify

    out = tmp_path / "merged"
    assert main(["--store", encoder_run["store"], "--run", RUN, "--out", str(out),
                 "--dtype", "float32"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "blue", 1: "green", 2: "red"}
    trainer = encoder_run["trainer"]
    samples = trainer.data.eval_samples()
    expected = classify.predict(trainer, samples)
    tok = AutoTokenizer.from_pretrained(out)
    texts = [r["text"] for r in trainer.data.eval_records]
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        logits = merged(**batch).logits
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_encoder_dir"])
def test_plan_counts_the_head_as_the_trainer_builds_it(which, request, tmp_path):
    from baton.session.plan import plan
    from baton.state_schema import RunConfig

    model_dir = request.getfixturevalue(which)
    data = write_jsonl(tmp_path / "train.jsonl", colour_records())
    config = RunConfig.model_validate({
        "run": "p", "store": str(tmp_path / "s"), "task": "classification",
        "model": {"name": str(model_dir), "load_in_4bit": False},
        "lora": {"r": 8, "alpha": 16}, "data": {"train": str(data), "eval": 0.125},
        "train": {"batch_size": 4, "seed": 7}})
    result = plan(config)
    trainer = make_trainer(classification_spec(model_dir, data, max_steps=1), data)
    head = sum(p.numel() for n, p in trainer.model.named_parameters() if "modules_to_save" in n)
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    hidden = 64
    assert head == (hidden * 3 if which == "tiny_model_dir" else hidden * hidden + hidden
                    + hidden * 3 + 3)  # score: no bias; classifier: dense + out_proj
    assert (result["head_params"], result["trainable_params"]) == (head, trained)
    assert result["labels"] == ["blue", "green", "red"] and result["task"] == "classification"


def test_a_remapped_csv_trains_as_a_classifier(tmp_path, tiny_encoder_dir):
    """`data.columns: {text: complaint, label: product}` on a CSV: the spec keeps the mapping
    and the label set read through it; the engine trains on the mapped records."""
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore
    from baton.scripts.classify_data import write
    from baton.session.spec import prepare_spec
    from baton.state_schema import RunConfig

    data = write(tmp_path / "complaints.csv", colour_records(24),
                 columns={"text": "complaint", "label": "product"})
    config = RunConfig.model_validate({
        "run": "csv", "store": str(tmp_path / "store"), "task": "classification",
        "model": {"name": str(tiny_encoder_dir), "load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(data), "eval": 0.25, "max_seq_len": 32,
                 "columns": {"text": "complaint", "label": "product"}},
        "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "optimizer": "adamw"}})
    spec = prepare_spec(RunStore(open_store(config.store), "csv"), config)
    assert spec.task == "classification" and spec.labels == ["blue", "green", "red"]
    assert spec.data.columns == {"text": "complaint", "label": "product"}
    trainer = make_trainer(spec, data, micro=2, kernels="auto")
    assert trainer.data.train_records[0].keys() == {"text", "label"}
    for _ in range(2):
        trainer.train_step()
    assert trainer.finished and trainer.evaluate() is not None
    assert 0 <= trainer.cursor.eval_accuracy <= 1


def test_decoder_classifier_trains_the_same_on_the_triton_kernels(decoder):
    """Triton's RMSNorm, RoPE, SwiGLU and fused LoRA projections (in the interpreter on a
    CPU) patch the sequence classifier, the fused LM loss does not (there is no lm_head), and
    two steps match the plain HF + PEFT modules."""
    from baton.kernels.patch import restore_rope

    spec, data, _ = decoder
    spec = spec.model_copy(update={"model": spec.model.model_copy(
        update={"load_in_4bit": False}), "train": spec.train.model_copy(update={"max_steps": 2})})
    plain = make_trainer(spec, data, micro=4, kernels="none")
    expected = [plain.train_step().loss for _ in range(2)]
    try:
        fused = make_trainer(spec, data, micro=4, kernels="triton")
        assert fused.device_info.kernels == "triton"
        got = [fused.train_step().loss for _ in range(2)]
    finally:
        restore_rope()  # process-wide: leave HF's own for the other tests
    installed = {getattr(getattr(m.forward, "__func__", m.forward), "__name__", "")
                 for m in fused.model.modules()}
    assert "_rmsnorm_forward" in installed  # the MLP's SwiGLU sits inside the fused LoRA MLP
    assert any(getattr(m.forward, "_baton_lora", False) for m in fused.model.modules())
    assert got == pytest.approx(expected, abs=1e-5)
    head = lambda t: t.model.base_model.model.score.modules_to_save["default"].weight  # noqa: E731
    torch.testing.assert_close(head(fused), head(plain), atol=1e-5, rtol=1e-4)
