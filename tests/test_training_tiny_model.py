"""scripts/tiny_model.py: deterministic tiny models with a chat-capable tokenizer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fixtures_tiny import ROOT


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    from tiny_model import build_tiny

    again = build_tiny(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_tokenizer_and_model_fit_together(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert len(tok) <= config.vocab_size and config.vocab_size % 64 == 0
    assert tok.pad_token_id != tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|user|>\nhi</s>\n<|assistant|>\n"
    text = "def f(x):\n    return x"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(tmp_path, arch):
    from tiny_model import build_tiny
    from transformers import AutoConfig

    path = build_tiny(tmp_path / arch, arch, corpus=["a b c d e f g"] * 10, vocab_size=300)
    assert AutoConfig.from_pretrained(path).model_type == arch


def test_cli_and_bad_sizes(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_model.py"),
                           str(tmp_path / "cli")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    from tiny_model import build_tiny

    with pytest.raises(ValueError, match="multiples of 64"):
        build_tiny(tmp_path / "bad", hidden=48)
