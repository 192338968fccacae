"""Sharded sessions (train.sharding fsdp) on two gloo ranks against one process.

One 2-rank process group (tests/sharded_worker.py) runs every sharded task of the module: the
gather of crafted NF4 bytes, two steps on the tiny Llama, Qwen2 and Mistral and on SmolLM2,
and the first session of the mixed handoff. The single-process references run in this process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_tiny import make_spec, pairs_records, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("llama", "qwen2", "mistral")
TOL = 1e-5  # fp32, two ranks against one: the bound
MIX_STEPS = 6  # sharded(2) 0->2, single 2->4, sharded(2) 4->6, against one whole run


def spawn(tmp: Path, name: str, tasks: list[dict], world: int = 2) -> None:
    job = tmp / f"{name}.job.json"
    job.write_text(json.dumps({"world": world, "out": str(tmp), "tasks": tasks}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_worker.py"), str(job)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def in_process(tmp: Path, tasks: list[dict]) -> None:
    """The single-process references, in this process (no second interpreter to start)."""
    from tests.sharded_worker import run_tasks

    with mock.patch.dict(os.environ, {"BATON_KERNELS": "none"}):
        run_tasks({"out": str(tmp), "tasks": tasks}, 0)


def result(tmp: Path, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / f"{name}.{rank}.pt", weights_only=False)


def task(name: str, spec, data: Path, until: int, **extra) -> dict:
    return {"kind": "train", "name": name, "spec": spec.to_json().decode(), "data": str(data),
            "micro": 1, "until": until, **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, real_model_dir):
    """Every model's spec, the sharded runs (one process group) and the references."""
    from tiny_model import build_tiny

    tmp = tmp_path_factory.mktemp("sharded")
    data = write_jsonl(tmp / "train.jsonl", pairs_records())
    models = {"llama": tiny_model_dir, "smollm2": real_model_dir}
    for arch in ("qwen2", "mistral"):
        models[arch] = build_tiny(tmp / arch, arch)
    # batch 3 on 2 ranks: rank 1 trains one micro-batch fewer and joins rank 0's gathers.
    # SmolLM2, the slow one: one sample a rank, no eval split.
    specs = {name: make_spec(path, data, max_steps=MIX_STEPS, batch_size=3, eval_=0.125)
             for name, path in models.items() if name != "smollm2"}
    specs["smollm2"] = make_spec(real_model_dir, data, max_steps=MIX_STEPS, batch_size=2,
                                 eval_=0.0)
    steps = {name: 1 if name == "smollm2" else 2 for name in models}
    sharded = [{"kind": "gather", "name": "gather"}]
    sharded += [task(n, specs[n], data, steps[n], sharding="fsdp") for n in models]
    sharded.append(task("mix1", specs["llama"], data, 2, sharding="fsdp",
                        final=str(tmp / "mix1")))
    spawn(tmp, "first", sharded)
    in_process(tmp, [task(f"{n}-one", specs[n], data, steps[n]) for n in models] + [
        task("mix2", specs["llama"], data, 4, load=str(tmp / "mix1"), final=str(tmp / "mix2")),
        task("whole", specs["llama"], data, MIX_STEPS, final=str(tmp / "whole"))])
    spawn(tmp, "third", [task("mix3", specs["llama"], data, MIX_STEPS, sharding="fsdp",
                              load=str(tmp / "mix2"), final=str(tmp / "mix3"))])
    return tmp


def test_gathered_nf4_bytes_equal_the_unsharded_ones_nan_patterns_included(runs):
    """uint8 storage, bf16 quant_storage, and bytes that read as fp16/bf16 NaN: after FSDP2's
    gather every packed byte, absmax code and scale is the original's, and Baton's
    dequantization of them is bitsandbytes' of the unsharded weight, bit for bit."""
    from tests.sharded_worker import NAN_PAIRS

    for rank in (0, 1):
        out = result(runs, "gather", rank)
        for want, got, local in zip(out["want"], out["got"], out["local"]):
            assert set(want) == {"packed", "absmax", "absmax2", "bias"}
            for name in want:
                assert torch.equal(want[name].view(torch.uint8), got[name].view(torch.uint8))
                assert local[name].numel() < want[name].numel()  # each rank held a shard
        crafted = out["want"][2]["packed"]
        as16 = crafted[: crafted.numel() // 2 * 2].view(torch.float16)
        assert as16.isnan().sum() >= len(NAN_PAIRS) and \
            crafted[: crafted.numel() // 2 * 2].view(torch.bfloat16).isnan().any()
        for ours, theirs in out["dequant"]:
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", [*ARCHS, "smollm2"])
def test_two_sharded_ranks_match_one_process(runs, name):
    sharded, one = result(runs, name), result(runs, f"{name}-one")
    assert [s["indices"] for s in sharded["steps"]] == [s["indices"] for s in one["steps"]]
    for a, b in zip(sharded["steps"], one["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=TOL) and a["lr"] == b["lr"]
    assert len(sharded["grads"]) == len(one["grads"]) > 0
    for got, want in zip(sharded["grads"], one["grads"]):
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        assert worst <= TOL, f"{name}: LoRA gradients differ by {worst}"
    if name != "smollm2":
        assert sharded["eval"] == pytest.approx(one["eval"], abs=TOL)


def test_a_rank_holds_its_shard_plus_one_gathered_layer(runs):
    """Counted at each decoder layer's forward (its gather done): of the decoder layers, every
    local shard plus the one layer gathered, at most half of them plus one layer. Over every
    group the root's lm_head is gathered too (docs/DESIGN.md, "Sharded sessions")."""
    for rank in (0, 1):
        out = result(runs, "llama", rank)
        layers, everything = out["sizes"]["layers"], out["sizes"]["all"]
        slack = 32 * 8  # FSDP2 pads each parameter's dim 0 to a multiple of the world
        assert out["resident"], "the layer hooks counted nothing"
        held = max(r[0] for r in out["resident"])
        # never more than one layer gathered on top of the shards, and the shards are there
        half = sum(layers) / 2
        assert half + max(layers) - slack <= held <= math.ceil(half) + max(layers) + slack
        print(f"rank {rank}: decoder layers resident {held} B of {sum(layers)} B (a layer "
              f"{max(layers)} B); all groups {max(r[1] for r in out['resident'])} of "
              f"{everything} B; peak RSS {out['peak_rss_kib'] / 1024:.0f} MiB")


def test_sharded_single_sharded_sessions_continue_exactly(runs):
    """sharded(2) -> one process -> sharded(2): the steps, learning rates and samples of one
    uninterrupted run, the losses within the parity bound, the same adapter file format."""
    whole = result(runs, "whole")["steps"]
    mixed = [s for n in ("mix1", "mix2", "mix3") for s in result(runs, n)["steps"]]
    assert [s["step"] for s in mixed] == list(range(1, MIX_STEPS + 1))
    assert [s["indices"] for s in mixed] == [s["indices"] for s in whole]
    assert [s["lr"] for s in mixed] == pytest.approx([s["lr"] for s in whole], abs=1e-12)
    assert [s["loss"] for s in mixed] == pytest.approx([s["loss"] for s in whole], abs=TOL)
    files = {n: load_file(str(runs / n / "adapter_model.safetensors")) for n in
             ("mix1", "mix3", "whole")}
    for name in ("mix1", "mix3"):
        assert {k: (v.dtype, v.shape) for k, v in files[name].items()} == \
            {k: (v.dtype, v.shape) for k, v in files["whole"].items()}
        assert sorted(p.name for p in (runs / name).iterdir()) == \
            sorted(p.name for p in (runs / "whole").iterdir())
    worst = max((files["mix3"][k] - files["whole"][k]).abs().max().item() for k in files["whole"])
    assert worst <= 1e-4, f"the handed-off adapter drifted by {worst}"


def run_config(model: str, seq_len: int = 2048, **train):
    from baton.state_schema import RunConfig

    return RunConfig.model_validate({"run": "r", "store": "/tmp/unused", "model": {"name": model},
                                     "data": {"train": "t.jsonl", "max_seq_len": seq_len},
                                     "train": train})


def test_auto_takes_ddp_when_one_gpu_fits_and_fsdp_otherwise(tiny_model_dir):
    from baton.session.sharding_plan import choose_sharding, one_gpu_estimate

    auto = run_config(str(tiny_model_dir))
    need = one_gpu_estimate(auto)
    assert choose_sharding(auto, 2, need) == "ddp"
    assert choose_sharding(auto, 2, need - 1) == "fsdp"
    assert choose_sharding(auto, 2, None) == "ddp"  # the CPU: no GPU memory to compare with
    assert choose_sharding(auto, 1, 1) == "ddp"  # one rank: nothing to shard
    assert choose_sharding(run_config(str(tiny_model_dir), sharding="fsdp"), 2, 10**15) == "fsdp"


def test_plan_shows_a_14b_fitting_two_t4s_sharded_but_not_one():
    """Qwen3-14B's shapes (config only, nothing downloaded): at 2048 tokens the issue's 17.88
    GiB on one GPU; at 1024, 16.00 GiB on one and 14.10 GiB a rank sharded over two."""
    from transformers import Qwen3Config

    from baton.session.plan import (GIB, _with_sharded, count_params, estimate_sharded,
                                    estimate_vram, gpu_table, meta_lora_model)

    cfg = Qwen3Config(hidden_size=5120, num_hidden_layers=40, intermediate_size=17408,
                      vocab_size=151936, num_attention_heads=40, num_key_value_heads=8,
                      head_dim=128, tie_word_embeddings=False)
    config = run_config("Qwen/Qwen3-14B", seq_len=1024)
    params = count_params(meta_lora_model(cfg, config.lora))
    assert round(estimate_vram(cfg, params, run_config("q"))["total"] / GIB, 2) == 17.88
    one = estimate_vram(cfg, params, config)
    sharded = estimate_sharded(cfg, params, config, 2)
    assert sharded["weights_shard"] == one["weights"] // 2
    assert sharded["lora_and_optimizer"] == one["lora_and_optimizer"]  # replicated
    table = _with_sharded(gpu_table(params, one["total"], None, 3600), cfg, params, config)
    assert not table["T4-16GB"]["fits"] and table["2×T4 sharded"]["fits"]
    assert table["2×T4 sharded"]["per_rank_bytes"] == sharded["total"] < 15 * GIB


@pytest.mark.parametrize("settings, words", [
    ({"model": {"name": "m", "load_in_4bit": False}}, "model.load_in_4bit"),
    ({"model": {"name": "m"}, "task": "classification"}, "task: classification"),
])
def test_fsdp_without_a_4bit_causal_lm_is_refused_at_the_config(settings, words):
    from pydantic import ValidationError

    from baton.state_schema import RunConfig

    with pytest.raises(ValidationError, match=words):
        RunConfig.model_validate({"run": "r", "store": "/tmp/unused", "data": {"train": "t.jsonl"},
                                  "train": {"sharding": "fsdp"}, **settings})
    RunConfig.model_validate({"run": "r", "store": "/tmp/unused", "data": {"train": "t.jsonl"},
                              "train": {"sharding": "auto"}, **settings})  # auto may take ddp
