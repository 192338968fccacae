"""scripts/merge.py: a real checkpoint in a store, merged, reloaded with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baton.handoff import open_store
from baton.handoff.checkpoint import commit_checkpoint
from baton.handoff.runstore import RunStore
from baton.scripts import merge as merge_script
from baton.scripts.tiny_model import build_tiny
from baton.state_schema import Cursor, DataSpec, LoraConfig, ModelConfig, RunSpec, TrainSpec

RUN = "merge-run"
TEXT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _spec(model_dir: Path) -> RunSpec:
    from baton.training.model import resolve_revision

    return RunSpec(
        run=RUN, model=ModelConfig(name=str(model_dir),
                                   revision=resolve_revision(str(model_dir), "main")),
        lora=LoraConfig(r=8, alpha=16, target_modules="all-linear"),
        data=DataSpec(source="d.jsonl", key=f"{RUN}/data/x.jsonl", sha256="0" * 64,
                      format="pairs", eval=None, max_seq_len=64, packing=False),
        train=TrainSpec(max_steps=10, batch_size=2, lr=1e-3, schedule="constant", warmup=0.0,
                        optimizer="adamw", max_grad_norm=1.0, weight_decay=0.0, seed=1),
    )


def _adapter(model_dir: Path, out: Path, step: int, seed: int) -> Path:
    """A PEFT adapter with nonzero B, saved the way the engine saves one, plus its cursor."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           PeftLora(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    (out / "cursor.json").write_bytes(Cursor(step=step, total_steps=10).to_json())
    return out


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(TEXT, return_tensors="pt")).logits.float()


@pytest.fixture
def run_store(tmp_path, tiny) -> str:
    uri = str(tmp_path / "store")
    rs = RunStore(open_store(uri), RUN)
    rs.create_spec(_spec(tiny))
    commit_checkpoint(rs, _adapter(tiny, tmp_path / "a5", 5, seed=1), step=5, generation=1)
    commit_checkpoint(rs, _adapter(tiny, tmp_path / "a10", 10, seed=2), step=10, generation=1,
                      finished=True)
    return uri


def _reference(tiny: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(adapter))
    return _logits(model.eval(), AutoTokenizer.from_pretrained(tiny))


def test_merge_reloads_with_plain_transformers(tmp_path, tiny, run_store, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code = merge_script.main(["--store", run_store, "--run", RUN, "--out", str(out),
                              "--dtype", "float32", "--max-shard-size", "100KB"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "step 10 of 10" in printed and "max abs logit difference" in printed
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("adapter_*"))  # a plain model, no PEFT files

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    got = _logits(merged, AutoTokenizer.from_pretrained(out))
    want = _reference(tiny, tmp_path / "a10")
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny).eval(),
                   AutoTokenizer.from_pretrained(tiny))
    assert (want - base).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    provenance = json.loads((out / "baton_merge.json").read_text())
    assert provenance["checkpoint"] == "00000010-g1" and provenance["dtype"] == "float32"


def test_named_checkpoint_in_bfloat16_pushed_to_hub(tmp_path, tiny, run_store, capsys,
                                                    hub_server):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged5"
    repo = hub_server.new_repo_uri().removeprefix("hf://")
    code = merge_script.main(["--store", run_store, "--run", RUN, "--out", str(out),
                              "--checkpoint", "00000005-g1", "--dtype", "bfloat16",
                              "--push-to-hub", repo])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "not finished" in printed and "(private)" in printed
    pushed = hub_server.files(repo)
    for path in out.iterdir():
        assert pushed[path.name] == path.read_bytes()
    assert hub_server.state.repos[repo].private
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    got = _logits(merged.eval(), AutoTokenizer.from_pretrained(out))
    want = _reference(tiny, tmp_path / "a5")
    assert (got - want).abs().max() < 0.05 * max(1.0, float(want.abs().max()))


def test_tolerance_breach_exits_1(tmp_path, run_store, capsys):
    code = merge_script.main(["--store", run_store, "--run", RUN, "--out",
                              str(tmp_path / "m"), "--dtype", "bfloat16", "--atol", "1e-12"])
    captured = capsys.readouterr()
    assert code == 1 and "OVER the tolerance" in captured.out
    assert "does not reproduce" in captured.err


def test_invalid_inputs_exit_2(tmp_path, run_store, capsys):
    def run(*extra: str, out: str = "m") -> int:
        return merge_script.main(["--store", run_store, "--out", str(tmp_path / out), *extra])

    assert run("--run", "no-such-run") == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert run("--run", RUN, "--checkpoint", "00000007-g1") == 2
    assert "00000005-g1, 00000010-g1" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert run("--run", RUN, out="full") == 2
    assert "not an empty folder" in capsys.readouterr().err
    store = open_store(run_store)
    store.write(f"{RUN}/checkpoints/00000005-g1/adapter_model.safetensors", b"tampered")
    assert run("--run", RUN, "--checkpoint", "00000005-g1") == 2
    err = capsys.readouterr().err
    assert "'00000005-g1'" in err and "cannot be used" in err and "adapter_model" in err
