"""Notifications (session/notify.py): real apprise posting to a local HTTP server.

The agent tests run the real CLI: a lease conflict (73), a pause (75), a finish (0) and a
failure (1) each send one message with run, step, loss and the reason; a URL that cannot be
reached is logged and changes nothing; the URLs' tokens reach no output and no stored file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.agent_helpers import (
    agent_env,
    open_run,
    run_agent,
    write_config,
    write_data,
)

TOKEN = "tk9Zq3SECRETnotifyTOKEN"  # stands for a webhook token inside a notify URL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("notify-inputs")
    return {"model": tiny_model_dir, "data": write_data(folder / "train.jsonl")}


def dead_url() -> str:
    """An apprise URL nobody answers: a port bound and closed again, short timeouts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"json://127.0.0.1:{port}/{TOKEN}-dead?cto=1&rto=1"


def stored_bytes(store: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file())


# -- the message and the sender ------------------------------------------------------------

def test_compose_says_run_step_loss_and_what_to_do():
    from baton.session.codes import FAILED, FINISHED, HELD, PAUSED
    from baton.session.notify import Report, compose

    report = Report("mistral-advisor", step=120, total=900, loss=1.23456)
    title, body = compose(report, PAUSED, "")
    assert title == "baton: mistral-advisor paused"
    assert body == ("run mistral-advisor paused at step 120/900, loss 1.2346. "
                    "Start the next session to continue.")
    assert "Merge it" in compose(report, FINISHED)[1]
    held = compose(Report("r", step=3), HELD, "run 'r' is leased by host-a\nmore lines")[1]
    assert held == "run r not started: the lease is held at step 3. " \
                   "Reason: run 'r' is leased by host-a"
    failed = compose(Report("r"), FAILED, "x" * 1000)[1]
    assert failed.startswith("run r failed. Reason: x") and len(failed) < 400


def test_send_posts_one_json_message(notify_sink):
    from baton.session.notify import send

    assert send([notify_sink.url("hook")], "baton: t paused", "run t paused at step 3/6.")
    [message] = notify_sink.wait("hook")
    assert message["title"] == "baton: t paused"
    assert message["message"] == "run t paused at step 3/6."
    assert message["type"] == "info"


def test_a_failed_notification_is_logged_scrubbed_and_never_raises(notify_sink, caplog):
    from baton.handoff.secrets import ScrubFilter
    from baton.session.notify import send

    caplog.handler.addFilter(ScrubFilter())  # as agent.py installs it on its handler
    with caplog.at_level(logging.DEBUG):
        ok = send([dead_url(), notify_sink.url("alive")], "t", "body")
    assert ok is False
    assert len(notify_sink.wait("alive")) == 1, "the reachable URL still gets the message"
    assert "not delivered" in caplog.text
    assert TOKEN not in caplog.text


def test_check_urls_refuses_an_unknown_scheme_without_showing_it():
    from baton.session.notify import NotifyConfigError, check_urls

    with pytest.raises(NotifyConfigError, match=r"notify\[1\]") as err:
        check_urls(["ntfy://topic-a", f"nosuchscheme://{TOKEN}"])
    assert TOKEN not in str(err.value)


# -- the agent, end to end -----------------------------------------------------------------

@pytest.mark.slow
def test_agent_notifies_conflict_pause_finish_and_keeps_urls_secret(tiny, tmp_path,
                                                                     notify_sink):
    from baton.handoff.lease import LeaseManager

    store = tmp_path / "store"
    hook = f"hook/{TOKEN}"
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store=str(store), notify=[notify_sink.url(hook)])
    outputs = []

    # 73: another agent holds the lease.
    holder = LeaseManager(open_run(str(store)), host="other-host")
    holder.acquire()
    held = run_agent(config, "--notify", dead_url(), workdir=tmp_path / "w")
    outputs.append(held.stdout + held.stderr)
    assert held.returncode == 73, outputs[-1]
    holder.release()
    # 75: the session's time is already spent; 0: the run trains to its end.
    paused = run_agent(config, "--session-limit", "1s", workdir=tmp_path / "w")
    outputs.append(paused.stdout + paused.stderr)
    assert paused.returncode == 75, outputs[-1]
    done = run_agent(config, workdir=tmp_path / "w")
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, outputs[-1]

    bodies = [m["message"] for m in notify_sink.wait(hook, count=3)]
    assert len(bodies) == 3, bodies
    assert bodies[0].startswith("run t not started: the lease is held") and "other-host" in \
        bodies[0]
    assert bodies[1].startswith("run t paused") and "Start the next session" in bodies[1]
    assert bodies[2].startswith("run t finished at step 6/6, loss ")
    assert "not delivered" in outputs[0], "the dead --notify URL is logged, the run unaffected"
    for text in outputs:
        assert TOKEN not in text
    assert TOKEN.encode() not in stored_bytes(store), "notify URLs never reach the store"


@pytest.mark.slow
def test_agent_notifies_a_failure_with_its_reason(tiny, tmp_path, notify_sink):
    """Exit 1: a Hub store that never answers (nothing trained); the message says why."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, model_dir=tiny["model"], train_file=tiny["data"],
                          store="hf://someone/down-repo", notify=[notify_sink.url("fail")])
    env = dict(agent_env(), HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_TOKEN="hf_unused",
               BATON_TEST_RETRY="1,1")
    failed = run_agent(config, workdir=tmp_path / "w", env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [message] = notify_sink.wait("fail")
    assert message["type"] == "failure"
    assert message["message"].startswith("run t failed. Reason: the Hub at http://127.0.0.1")
