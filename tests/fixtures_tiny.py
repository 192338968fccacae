"""Shared helpers for training tests: a tiny local Llama, small data files, a RunSpec.

The fixtures (`tiny_model_dir`, `pairs_file`) come through conftest's `pytest_plugins`, so the
tiny model is built once per test session (about a second) and reused; import the helpers.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))


def pairs_records(n: int = 24) -> list[dict]:
    ops = ["+", "-", "*", "//"]
    return [{"prompt": f"def f{i}(x):\n", "completion": f"    return x {ops[i % 4]} {i}\n"}
            for i in range(n)]


def text_records(n: int = 24) -> list[dict]:
    return [{"text": f"import os\nvalue_{i} = os.path.join('a', '{i}')\n"} for i in range(n)]


def chat_records(n: int = 12) -> list[dict]:
    return [{"messages": [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": f"add {i}"},
        {"role": "assistant", "content": f"x + {i}"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": f"x + {i + 1}"},
    ]} for i in range(n)]


def random_samples(lengths, seed: int, vocab: int, *, low: int = 0, masked: int = 2) -> list:
    """Encoded samples of random ids in [low, vocab), one per length, each with its first
    `masked` labels ignored (a prompt), from a generator seeded with `seed`."""
    import torch

    from baton.training.encode import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(low, vocab, (n,), generator=g).tolist()
        out.append(Encoded(ids, [IGNORE] * masked + ids[masked:]))
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_spec(model_dir: Path, data_path: Path, *, fmt: str = "pairs", batch_size: int = 4,
              max_steps: Optional[int] = None, epochs: Optional[float] = None,
              optimizer_state: bool = True, eval_: object = 0.125, dropout: float = 0.0,
              packing: bool = False, max_seq_len: int = 64, schedule: str = "cosine",
              warmup: float = 0.2, eval_sha: Optional[str] = None):
    from baton.state_schema import DataSpec, LoraConfig, ModelConfig, RunSpec, TrainSpec
    from baton.training.data import fingerprint
    from baton.training.model import resolve_revision

    sha = fingerprint(data_path)
    return RunSpec(
        run="tiny",
        model=ModelConfig(name=str(model_dir), revision=resolve_revision(str(model_dir), "main")),
        lora=LoraConfig(r=8, alpha=16, dropout=dropout, target_modules="all-linear"),
        data=DataSpec(source=str(data_path), key=f"tiny/data/{sha}.jsonl", sha256=sha,
                      format=fmt, eval=eval_, eval_sha256=eval_sha, max_seq_len=max_seq_len,
                      packing=packing),
        train=TrainSpec(max_steps=max_steps, epochs=epochs, batch_size=batch_size, lr=2e-3,
                        schedule=schedule, warmup=warmup, optimizer="adamw",
                        max_grad_norm=1.0, weight_decay=0.01, seed=7),
        optimizer_state=optimizer_state,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_model import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pairs_records())


@contextmanager
def kernel_path(choice: str):
    """BATON_KERNELS for the span of a model build: 'none' trains the plain HF and PEFT
    modules, 'auto' what the agent picks for the device (the reference path on a CPU)."""
    with mock.patch.dict(os.environ, {"BATON_KERNELS": choice}):
        yield


def make_trainer(spec, data_path: Path, *, micro: int = 2, kernels: str = "none", **kw):
    """A CPU trainer of `spec` (its model is the spec's local folder)."""
    from baton.training.engine import Trainer

    with kernel_path(kernels):
        return Trainer(spec, data_path=data_path, micro_batch_size=micro, device="cpu", **kw)


# -- tiny models of the other families (GGUF export tests) -------------------------------------

GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
              "{% endif %}")


MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                "{{ m['content'] }} [/INST]{% elif m['role'] == 'assistant' %}{{ m['content'] }}"
                "{{ eos_token }}{% endif %}{% endfor %}")


def _spm_tokenizer(arch: str, corpus: list[str]):
    """A byte-fallback BPE with the family's own pipeline (transformers' GemmaTokenizer or
    LlamaTokenizer, as Mistral's, trained on the tiny corpus): the SentencePiece-style path."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    if arch == "gemma3":
        seed = GemmaTokenizer(vocab={"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, merges=[])
    else:
        seed = LlamaTokenizer(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[])
    tok = seed.train_new_from_iterator(corpus, vocab_size=512)
    if arch == "gemma3":
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_CHAT if arch == "gemma3" else MISTRAL_CHAT
    return tok


def build_family(out_dir: Path, arch: str) -> Path:
    """A tiny Qwen3, Gemma 3 or Mistral (with a SentencePiece-style tokenizer, as the real
    one) from transformers' own config classes, with norms moved off their init so that
    Gemma's (1 + w) shows in the logits."""
    import torch
    import transformers
    from tiny_model import default_corpus, train_tokenizer

    corpus = default_corpus()
    tok = train_tokenizer(corpus, 512) if arch == "qwen3" else _spm_tokenizer(arch, corpus)
    common = dict(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  head_dim=32, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "qwen3":
        model_cls, config = transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**common)
    elif arch == "mistral":
        model_cls, config = transformers.MistralForCausalLM, transformers.MistralConfig(**common)
    else:
        model_cls = transformers.Gemma3ForCausalLM
        config = transformers.Gemma3TextConfig(query_pre_attn_scalar=32, sliding_window=16,
                                               tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_arch_dir(tmp_path_factory, tiny_model_dir):
    """arch -> a tiny model folder of that family (llama, mistral, qwen2, qwen3, gemma3), each
    built once per session; mistral, qwen3 and gemma3 by build_family."""
    from tiny_model import build_tiny

    built = {"llama": tiny_model_dir}

    def get(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp("tiny-" + arch) / arch
            built[arch] = (build_family(out, arch) if arch in ("mistral", "qwen3", "gemma3")
                           else build_tiny(out, arch))
        return built[arch]

    return get
