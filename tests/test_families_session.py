"""Gemma 2 and GPT-OSS through a whole session (`agent.py run`, in this process): both used to
exit 1 on every Baton path (padding-free loaded them with SDPA, which they refuse). Now the
default path (reference kernels on the CPU, padding-free) trains them with their own eager
attention per sample, names it ("eager_spans") in the start line, the session record and
`status`, names the ops their family keeps unfused, and its per-step losses equal plain HF +
PEFT on padded rows (`BATON_KERNELS=none --no-padding-free`) within 1e-4.
"""

from __future__ import annotations

import pytest

from tests.agent_helpers import open_run, write_config, write_data
from tests.fixtures_families import save_family_model
from tests.inprocess import run_session_here


def _session(tmp_path, model_dir, name: str, monkeypatch, kernels: str, *flags: str):
    monkeypatch.setenv("BATON_KERNELS", kernels)
    store = str(tmp_path / f"store-{name}")
    config = write_config(tmp_path, model_dir=model_dir, store=store, run="t",
                          train_file=write_data(tmp_path / "d.jsonl"),
                          train={"max_steps": 3, "precision": "fp32"})
    code = run_session_here(config, tmp_path / f"work-{name}", *flags)
    (record,) = open_run(store).read_sessions()
    return code, record, store


@pytest.mark.parametrize("family,overrides,unfused", [
    ("gemma2", {}, None),  # its final-logit softcap goes to the fused loss
    # The router's auxiliary loss is HF's to add: the loss stays HF's, and says so.
    ("gpt_oss", {"output_router_logits": True},
     "fused_linear_cross_entropy (the router's auxiliary loss joins HF's)"),
])
def test_softcap_and_sink_families_train_padding_free_like_plain_hf(
        family, overrides, unfused, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from rich.console import Console

    from baton.handoff import open_store
    from baton.session.status import collect_status, render

    model_dir = save_family_model(family, tmp_path / family, tiny_model_dir, **overrides)
    code, plain, _ = _session(tmp_path, model_dir, "plain", monkeypatch, "none",
                              "--no-padding-free")
    assert code == 0 and plain.attention == "eager" and not plain.padding_free
    capsys.readouterr()
    code, baton, store = _session(tmp_path, model_dir, "baton", monkeypatch, "auto")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "(fp32, kernels reference, attention eager_spans" in out
    assert (baton.attention, baton.padding_free, baton.end_step) == ("eager_spans", True, 3)
    assert [s for s, _ in baton.losses] == [s for s, _ in plain.losses] == [1, 2, 3]
    assert [v for _, v in baton.losses] == pytest.approx([v for _, v in plain.losses], abs=1e-4)
    if unfused:
        assert f"unfused: {unfused}" in out and baton.kernels_unfused.startswith(unfused)
        console = Console(record=True, width=300)
        render(collect_status(open_store(store), "t"), console)
        assert f"unfused: {unfused}" in console.export_text()
    else:
        assert baton.kernels_unfused is None
