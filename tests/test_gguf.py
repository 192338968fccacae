"""GGUF export (export/, scripts/merge_gguf.py): a real file written from a real merged model,
read back by transformers' GGUF loader and by gguf's reader; the merge CLI's --gguf paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch

from baton.export import gguf_arch, gguf_verify, gguf_write
from baton.export.modelfile import faithful_wrappers, write_modelfile
from baton.scripts import merge as merge_script
from tests.fixtures_classify import classification_spec
from tests.fixtures_tiny import write_jsonl, pairs_records

Q = gguf.GGMLQuantizationType
CASES = [("llama", "f16"), ("mistral", "q8_0"), ("qwen2", "bf16"), ("qwen3", "q8_0"),
         ("gemma3", "q8_0")]


def export(folder: Path, out: Path, kind: str) -> tuple[Path, tuple[bool, str]]:
    path = out / f"m-{kind.upper()}.gguf"
    gguf_write.convert(folder, path, kind)
    return path, gguf_verify.verify(folder, path, kind, torch.float32, merge_script.probe_logits)


def reader_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_round_trip_through_transformers(tiny_arch_dir, tmp_path, arch, kind):
    folder = tiny_arch_dir(arch)
    path, (ok, message) = export(folder, tmp_path, kind)
    assert ok, message
    assert "metadata and tokenizer round-trip" in message
    tensors = reader_tensors(path)
    fields = gguf.GGUFReader(path).fields
    name = bytes(fields["general.architecture"].parts[-1]).decode()
    assert name == gguf_arch.ARCHS[{"gemma3": "gemma3_text"}.get(arch, arch)].gguf_name
    assert tensors["output_norm.weight"].tensor_type == Q.F32  # 1-D stays F32
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf_write.FILE_TYPES[kind][0]
    assert ("output.weight" in tensors) != (arch == "gemma3")  # tied: llama.cpp reuses token_embd


def test_f16_tensors_are_the_merged_weights_permuted_and_shifted(tiny_arch_dir, tmp_path):
    """Exact values where no rounding enters: llama's Q rows permuted to llama.cpp's RoPE
    layout, Gemma's norm as 1 + w, both checked against the safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    for arch, hf_name, name in (("llama", "model.layers.0.self_attn.q_proj.weight",
                                 "blk.0.attn_q.weight"),
                                ("gemma3", "model.layers.1.input_layernorm.weight",
                                 "blk.1.attn_norm.weight")):
        folder = tiny_arch_dir(arch)
        path = tmp_path / f"{arch}.gguf"
        gguf_write.convert(folder, path, "f16")
        hf = load_file(folder / "model.safetensors")[hf_name].float()
        stored = reader_tensors(path)[name]
        got = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(hf.shape)
        config = AutoConfig.from_pretrained(folder)
        want = gguf_arch.transform(gguf_arch.arch_of(config), config, hf_name, hf)
        assert not torch.equal(want, hf)  # the transform is not a no-op here
        want = want if stored.tensor_type == Q.F32 else want.half().float()
        np.testing.assert_array_equal(got, want.numpy())


def sharpened(folder: Path, out: Path) -> Path:
    """The model with Q and K scaled up: a random tiny model attends almost uniformly, so any
    order of the rotary dims gives nearly the same logits; a peaked attention does not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(6.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_missing_transform_fails_the_check(tiny_arch_dir, tmp_path, arch):
    """Without the Q/K permutation (llama) or the norm shift (gemma3) the file is wrong, and
    the logit check says so; with them the same model passes."""
    folder = tiny_arch_dir(arch)
    if arch == "llama":
        folder = sharpened(folder, tmp_path / "sharp")
    _, (ok, message) = export(folder, tmp_path, "f16")
    assert ok, message
    with mock.patch.object(gguf_arch, "transform", lambda arch, config, name, t: t):
        _, (ok, message) = export(folder, tmp_path, "f16")
    assert not ok and "logits differ" in message


def test_smollm2_q8_0_tokenizer_metadata_and_modelfile(real_model_dir, tmp_path):
    """The real tokenizer (49k tokens, ChatML markers) and chat template (with its default
    system prompt) survive the round trip; the logits of the real model are checked by the
    merge CLI and by scripts/bench_gguf.py, too slow for this suite."""
    from transformers import AutoTokenizer

    path = tmp_path / "smol-Q8_0.gguf"
    summary = gguf_write.convert(real_model_dir, path, "q8_0")
    assert summary["tokenizer_tokens"] == 49152 and summary["tokenizer_chat_template"]
    assert gguf_verify.check_metadata(real_model_dir, path) == []
    assert gguf_verify.tokenizer_mismatches(real_model_dir, path) == []
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    modelfile, why = write_modelfile(tmp_path, path.name, tokenizer, [tokenizer.eos_token_id])
    text = modelfile.read_text()
    assert why == "" and f"FROM ./{path.name}" in text
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in text  # default
    assert '{{ else if eq $m.Role "user" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_modelfile_leaves_out_a_template_it_cannot_replay(tiny_model_dir, tmp_path):
    """Gemma's real template folds the system prompt into the first user turn: no per-message
    wrapper reproduces it, so no TEMPLATE is written rather than a wrong one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' "
        "else '' %}{% for m in messages if m['role'] != 'system' %}<turn>{{ m['role'] }}\n"
        "{{ sys if loop.first else '' }}{{ m['content'] }}</turn>\n{% endfor %}")
    wrappers, why = faithful_wrappers(tokenizer)
    assert wrappers is None and why
    text = write_modelfile(tmp_path, "m.gguf", tokenizer, [tokenizer.eos_token_id])[0].read_text()
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and f"# No TEMPLATE: {why}" in text


# -- the merge CLI ------------------------------------------------------------------------------

@pytest.fixture
def merge_run(tmp_path, tiny_model_dir):
    """A run of the tiny llama with one finished checkpoint (an adapter with nonzero B)."""
    from tests.test_merge import RUN, _adapter, _spec
    from baton.handoff import open_store
    from baton.handoff.checkpoint import commit_checkpoint
    from baton.handoff.runstore import RunStore

    uri = str(tmp_path / "store")
    rs = RunStore(open_store(uri), RUN)
    rs.create_spec(_spec(tiny_model_dir))
    commit_checkpoint(rs, _adapter(tiny_model_dir, tmp_path / "a", 10, seed=2), step=10,
                      generation=1, finished=True)
    return uri, RUN


def merge(run, out: Path, *extra: str) -> int:
    uri, name = run
    return merge_script.main(["--store", uri, "--run", name, "--out", str(out),
                              "--dtype", "float32", *extra])


def test_gguf_only_pushed_with_its_card(merge_run, tmp_path, capsys, hub_server):
    out = tmp_path / "out"
    repo = hub_server.new_repo_uri().removeprefix("hf://")
    assert merge(merge_run, out, "--gguf", "q8_0", "--gguf-only", "--push-to-hub", repo) == 0
    printed = capsys.readouterr().out
    assert "metadata and tokenizer round-trip" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "README.md", "baton_merge.json", "merge-run-Q8_0.gguf"]
    assert "ollama create merge-run -f Modelfile" in (out / "README.md").read_text()
    pushed = hub_server.files(repo)
    assert pushed["merge-run-Q8_0.gguf"] == (out / "merge-run-Q8_0.gguf").read_bytes()


def test_a_wrong_gguf_exits_1(merge_run, tmp_path, capsys):
    def wrong(arch, config, name, tensor):  # norms off by half, as a lost norm shift would be
        return tensor * 1.5 if name.endswith("norm.weight") else tensor

    with mock.patch.object(gguf_arch, "transform", wrong):
        assert merge(merge_run, tmp_path / "out", "--gguf", "f16") == 1
    captured = capsys.readouterr()
    assert "logits differ" in captured.out and "does not reproduce" in captured.err


def test_q4_k_m_without_llama_quantize_exits_2_and_writes_nothing(merge_run, tmp_path, capsys):
    with mock.patch.dict(os.environ, {"PATH": str(tmp_path / "empty")}):
        assert merge(merge_run, tmp_path / "out", "--gguf", "q4_k_m") == 2
    assert "llama-quantize" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_q4_k_m_runs_llama_quantize_on_the_f16_file(merge_run, tmp_path, capsys):
    """The call wiring only: a stand-in `llama-quantize` records its arguments and copies the
    F16 file (the real binary is never downloaded or built here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "llama-quantize"
    stand_in.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncp "$1" "$2"\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IEXEC)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    with mock.patch.dict(os.environ, {"PATH": path}):
        assert merge(merge_run, tmp_path / "out", "--gguf", "q4_k_m") == 0
    src, dest, kind = (tmp_path / "args").read_text().split()
    assert src.endswith("merge-run-F16.gguf") and dest.endswith("merge-run-Q4_K_M.gguf")
    assert kind == "Q4_K_M" and not Path(src).exists() and Path(dest).is_file()
    assert "no bound for a k-quant" in capsys.readouterr().out


def test_a_classifier_run_is_refused_before_any_work(tiny_model_dir, tmp_path, capsys):
    from baton.handoff import open_store
    from baton.handoff.runstore import RunStore

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": r["prompt"], "label": "a" if i % 2 else "b"}
                                              for i, r in enumerate(pairs_records(8))])
    spec = classification_spec(tiny_model_dir, data, max_steps=2, labels=["a", "b"])
    RunStore(open_store(str(tmp_path / "store")), "cls").create_spec(spec)
    code = merge_script.main(["--store", str(tmp_path / "store"), "--run", "cls",
                              "--out", str(tmp_path / "out"), "--gguf", "q8_0"])
    assert code == 2 and "causal language models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_llama_cpp_greedy_tokens_match_transformers(real_model_dir, tmp_path):
    """llama.cpp itself runs the file: its greedy continuation equals transformers' on the
    merged model. llama-cpp-python has no wheel for this platform on PyPI, only an sdist that
    compiles llama.cpp (over 15 minutes on 2 cores), so it is not a pinned dependency."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(PyPI has only its sdist here; `pip install "
                                    "llama-cpp-python` builds llama.cpp from source)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "smol-F16.gguf"
    gguf_write.convert(real_model_dir, path, "f16")
    prompt = "The capital of France is"
    tokenizer = AutoTokenizer.from_pretrained(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, seed=0)
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert tokens == ids[0].tolist()
    got = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        got.append(token)
        if len(got) == len(want):
            break
    assert got == want


def test_pre_tokenizer_names_and_refusals():
    """llama.cpp's pre-tokenizer name comes from the split rule; an unknown rule, an
    architecture or a task llama.cpp does not serve is refused with a message (exit 2)."""
    from transformers import GPT2Config, LlamaConfig
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from baton.export.errors import ExportError
    from baton.export.gguf_vocab import byte_level_pre

    def split(regex: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": False}]}}

    assert byte_level_pre(split(GGUF_PRE_TOKENIZER_SPLITS["llama3"])) == "llama-bpe"
    assert byte_level_pre(split(GGUF_PRE_TOKENIZER_SPLITS["qwen2"])) == "qwen2"
    assert byte_level_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}}) == "smollm"
    with pytest.raises(ExportError, match="no known llama.cpp name"):
        byte_level_pre(split(r"\w+|\s+"))
    with pytest.raises(ExportError, match="does not support model type 'gpt2'"):
        gguf_arch.arch_of(GPT2Config())
    with pytest.raises(ExportError, match="causal language models"):
        gguf_arch.arch_of(LlamaConfig(architectures=["LlamaForSequenceClassification"]))
