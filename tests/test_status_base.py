"""status reads every eval loss against the base model's, measured before step 1."""

from __future__ import annotations

import io

from rich.console import Console

from baton.session.status import RunView, plot_losses, render, summarize
from baton.state_schema import Cursor, SessionRecord


def view(cursor_base, record_base) -> RunView:
    cursor = Cursor(total_steps=10, step=4, eval_loss=1.49, base_eval_loss=cursor_base,
                    losses=[(1, 2.0), (4, 1.6)])
    record = SessionRecord(session_id="s1", host="vm", end_step=4, base_eval_loss=record_base,
                           eval_losses=[(1, 1.65), (4, 1.49)], losses=[(1, 2.0), (4, 1.6)])
    return RunView(run="r", store_uri="mem", spec=None, head=None, lease=None,
                   sessions=[record], cursor=cursor, checkpoints=[])


def test_status_json_and_text_show_the_base_eval_loss():
    status = summarize(view(1.7, 1.7))
    assert status["base_eval_loss"] == 1.7 and status["eval_loss"] == 1.49
    out = io.StringIO()
    render(status, Console(file=out, width=120))
    assert "1.4900, base 1.7000" in out.getvalue()


def test_the_session_record_stands_in_for_an_old_cursor(tmp_path):
    assert summarize(view(None, 1.8))["base_eval_loss"] == 1.8
    assert summarize(view(None, None))["base_eval_loss"] is None
    assert plot_losses(view(1.7, 1.7), tmp_path / "loss.png").stat().st_size > 0


def test_trainer_measures_the_base_before_its_first_step(tiny_model_dir, tmp_path):
    from tests.fixtures_tiny import make_spec, make_trainer, pairs_records, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", pairs_records(16))
    spec = make_spec(tiny_model_dir, data, max_steps=2, eval_=0.25)
    fresh = make_trainer(spec, data).evaluate()  # a fresh adapter: the base model's own loss
    trainer = make_trainer(spec, data)
    trainer.train_step()
    assert trainer.cursor.base_eval_loss == fresh
    assert trainer.cursor.eval_loss is None  # the base is not a mid-run eval
    trainer.train_step()
    assert trainer.cursor.base_eval_loss == fresh  # measured once, at step 0
