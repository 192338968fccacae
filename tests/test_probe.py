"""The start-up kernel probe (session/probe.py, kernels/probe.py).

On the CPU the Triton path runs in Triton's interpreter (BATON_KERNELS=triton,
TRITON_INTERPRET=1), so the probe's child runs the real kernels there; BATON_PROBE_FAULT
(tests/probe_entry.py) makes one op abort(3) as an LLVM abort would, and the session must
carry on with the reference path and say so in its record and in `status`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.agent_helpers import open_run, write_config, write_data
from tests.faults import faulty_probe_command
from tests.inprocess import run_session_here


def test_an_aborted_probe_falls_back_to_the_reference_path(tmp_path, tiny_model_dir,
                                                           monkeypatch, capsys):
    """The ops before lora_mlp run for real in the child (fp16, Triton's interpreter);
    lora_mlp aborts (SIGABRT, BATON_PROBE_FAULT's hook). The session survives, trains on the
    reference path, and record and status say why."""
    from rich.console import Console

    from baton.handoff import open_store
    from baton.session import probe
    from baton.session.status import collect_status, render

    monkeypatch.setattr(probe, "probe_command", faulty_probe_command)
    for name, value in (("BATON_KERNELS", "triton"), ("TRITON_INTERPRET", "1"),
                        ("BATON_PROBE_FAULT", "abort:lora_mlp")):
        monkeypatch.setenv(name, value)

    store = str(tmp_path / "store")
    config = write_config(tmp_path, model_dir=tiny_model_dir, store=store,
                          train_file=write_data(tmp_path / "d.jsonl"),
                          train={"max_steps": 2, "precision": "fp16"})
    code = run_session_here(config, tmp_path / "work")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Triton kernel probe failed (lora_mlp killed by SIGABRT)" in out
    assert "(fp16, kernels reference," in out
    (record,) = open_run(store).read_sessions()
    assert record.kernels == "reference" and record.end_step == 2
    assert record.kernels_probe == "failed: lora_mlp killed by SIGABRT"
    status = collect_status(open_store(store), "t")
    assert status["sessions"][0]["kernels_probe"] == record.kernels_probe
    console = Console(record=True, width=200)
    render(status, console)
    assert "reference (probe: lora_mlp killed by SIGABRT)" in console.export_text()


def test_the_probe_is_skipped_where_no_triton_kernel_runs(monkeypatch):
    from baton.session.probe import decide, kernels_text

    device = SimpleNamespace(device="cpu", precision="fp32")
    said: list[str] = []
    monkeypatch.delenv("BATON_KERNELS", raising=False)
    outcome = decide(None, device, said.append)  # the spec is not even read
    assert (outcome.path, outcome.note) == (
        "reference", "skipped: the reference path runs no Triton kernel")
    assert kernels_text(outcome.path, outcome.note) == "reference (probe skipped)"
    monkeypatch.setenv("BATON_KERNELS", "none")
    assert decide(None, device, said.append).path == "none" and not said
    assert kernels_text("triton", "passed 7 ops in 3.1 s") == "triton (probe passed)"
    assert kernels_text("reference", None) == "reference", "a record older than the probe"


@pytest.mark.parametrize("code, events, reason", [
    (-6, [{"op": "rmsnorm"}, {"op": "rmsnorm", "ok": True}, {"op": "rope"}],
     "rope killed by SIGABRT"),
    (1, [{"op": "swiglu"}, {"error": "CompilationError: at 3:4: bad"}],
     "swiglu: CompilationError: at 3:4: bad"),
    (-11, [], "start-up killed by SIGSEGV"),
    (3, [{"op": "rmsnorm"}, {"op": "rmsnorm", "ok": True}], "start-up: exit 3"),
])
def test_the_probe_names_the_op_that_failed(code, events, reason):
    from baton.session.probe import _reason

    assert _reason(code, events) == reason


def test_the_job_has_the_models_sizes_and_the_runs_dtype():
    from baton.session.probe import job_for

    llama8b = SimpleNamespace(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, hidden_act="silu",
                              rms_norm_eps=1e-5)
    spec = SimpleNamespace(lora=SimpleNamespace(r=16), model=SimpleNamespace(load_in_4bit=True))
    job = job_for(spec, SimpleNamespace(device="cuda:1", precision="fp16"), llama8b)
    assert job["ops"] == ["rmsnorm", "rope", "swiglu", "lora_qkv", "lora_linear", "lora_mlp",
                          "cross_entropy"]
    assert (job["head_dim"], job["kv_heads"], job["vocab"], job["nf4"], job["device"]) == (
        128, 8, 128256, True, "cuda:1")
    assert job["tokens"] == 16  # a caller that does not know the micro-batch
    # A session's first micro-batch: 4 samples of up to 2,048 tokens, one padding-free row.
    assert job_for(spec, SimpleNamespace(device="cuda:0", precision="fp16"), llama8b,
                   tokens=4 * 2048)["tokens"] == 8192
    other = SimpleNamespace(**{**vars(llama8b), "model_type": "cohere"})
    assert job_for(spec, SimpleNamespace(device="cuda:0", precision="bf16"), other)["ops"] == [
        "lora_qkv", "lora_linear", "cross_entropy"], "outside the table: LoRA and the loss"
    gemma = SimpleNamespace(**{**vars(llama8b), "model_type": "gemma2", "head_dim": 256,
                               "hidden_activation": "gelu_pytorch_tanh"})
    job = job_for(spec, SimpleNamespace(device="cuda:0", precision="bf16"), gemma)
    assert job["ops"] == ["rmsnorm", "rope", "geglu", "lora_qkv", "lora_linear", "cross_entropy"]
    assert (job["norm_offset"], job["norm_cast_after"], job["rotary_dim"]) == (1.0, True, 256)
    phi = SimpleNamespace(**{**vars(llama8b), "model_type": "phi3", "rope_parameters": {
        "rope_type": "default", "partial_rotary_factor": 0.75}})
    job = job_for(spec, SimpleNamespace(device="cuda:0", precision="bf16"), phi)
    assert "lora_mlp" not in job["ops"] and job["rotary_dim"] == 96  # merged gate_up_proj


TINY_JOB = dict(device="cpu", hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                vocab=512, rank=8, nf4=False, tokens=8)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_probe_op_passes_on_the_kernels_it_checks(precision, capsys):
    """Each op, in Triton's interpreter (conftest sets TRITON_INTERPRET=1), within the
    probe's tolerance of its reference: a probe that fails on good kernels would quietly
    send every GPU session to the slow path."""
    from baton.kernels import probe

    probe.run(probe.ProbeJob(precision=precision, **TINY_JOB))
    lines = [line for line in capsys.readouterr().out.splitlines() if '"ok": true' in line]
    assert len(lines) == len(probe.OPS)


def test_the_family_variants_pass_the_probe(capsys):
    """Gemma's (1 + w) RMSNorm with its fp32 casts, partial rotary, GeGLU."""
    from baton.kernels import probe

    probe.run(probe.ProbeJob(precision="bf16", ops=["rmsnorm", "rope", "geglu"],
                             norm_offset=1.0, norm_cast_after=True, rotary_dim=8, **TINY_JOB))
    assert capsys.readouterr().out.count('"ok": true') == 3


def test_a_kernel_that_computes_garbage_fails_the_probe(monkeypatch):
    import torch

    from baton.kernels import probe, swiglu

    monkeypatch.setattr(swiglu, "swiglu", lambda gate, up: torch.zeros_like(gate))
    with pytest.raises(probe.ProbeMismatch, match="swiglu: relative error"):
        probe.run(probe.ProbeJob(precision="fp16", ops=["swiglu"], **TINY_JOB))
