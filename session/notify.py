"""Notifications at the end of a session: one short message to each `notify:` URL.

A session that pauses, finishes, fails or finds the lease held tells the person (ntfy,
Discord, Slack, Telegram, email: any scheme apprise knows), so a run on a free notebook needs
no one watching it. Two rules hold whatever happens:

- a notification is a courtesy: one that fails is logged and never changes the exit code;
- the URLs carry their tokens (a webhook id, a topic, a password), so they are registered with
  the one scrubber (handoff/secrets.py) before any text could hold them, are logged only in
  apprise's privacy form, and never reach the spec, the store or status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import parse_qsl, urlsplit

from baton.handoff.secrets import register_secret, scrub

from .codes import FAILED, FINISHED, HELD, INVALID, PAUSED

log = logging.getLogger("baton.notify")

MIN_PIECE = 6  # URL pieces shorter than this (a port, "api") are not worth blanking in logs
REASON_CHARS = 300  # one short message: the first line of the reason, cut here


class NotifyConfigError(ValueError):
    """A notify URL that apprise cannot use; the message never holds the URL itself."""


@dataclass
class Report:
    """What the message tells: filled in by the session as it learns it."""

    run: str
    step: Optional[int] = None
    total: Optional[int] = None
    loss: Optional[float] = None


# exit code -> (what happened, apprise's notify type)
EVENTS = {
    FINISHED: ("finished", "success"),
    PAUSED: ("paused", "info"),
    FAILED: ("failed", "failure"),
    HELD: ("not started: the lease is held", "warning"),
    INVALID: ("failed: invalid input", "failure"),
}


def protect(urls: Iterable[str]) -> None:
    """Register each URL, and each longer piece of it (user, password, path segments, query
    values, and a host without dots: any may be the token, as in discord://ID/TOKEN), with
    the scrubber. A dotted host (ntfy.sh, 127.0.0.1) is a public name and stays readable."""
    for url in urls:
        register_secret(url)
        parts = urlsplit(url)
        host = parts.hostname if parts.hostname and "." not in parts.hostname else None
        pieces = [parts.username, parts.password, host,
                  *parts.path.split("/"), *(v for _, v in parse_qsl(parts.query))]
        for piece in pieces:
            if piece and len(piece) >= MIN_PIECE:
                register_secret(piece)


def check_urls(urls: list[str]) -> None:
    """Refuse, before anything heavy starts, a URL apprise does not understand."""
    import apprise

    protect(urls)
    for i, url in enumerate(urls):
        if not isinstance(url, str) or not apprise.Apprise().add(url):
            raise NotifyConfigError(
                f"notify[{i}] is not a URL apprise can send to (the URL is not shown: it may "
                "hold a token); see https://github.com/caronc/apprise/wiki for the schemes, "
                "e.g. ntfy://TOPIC or discord://WEBHOOK_ID/WEBHOOK_TOKEN")


def compose(report: Report, code: int, reason: str = "") -> tuple[str, str]:
    """(title, body) of the message for a session that ended with `code`."""
    what = EVENTS.get(code, (f"ended with exit code {code}", "failure"))[0]
    at = "" if report.step is None else f" at step {report.step}" + (
        f"/{report.total}" if report.total else "")
    loss = "" if report.loss is None else f", loss {report.loss:.4f}"
    body = f"run {report.run} {what}{at}{loss}."
    if code == PAUSED:
        body += " Start the next session to continue."
    elif code == FINISHED:
        body += " Merge it with scripts/merge.py."
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    if first and code not in (PAUSED, FINISHED):
        body += f" Reason: {first[:REASON_CHARS]}"
    return f"baton: {report.run} {what.split(':')[0]}", scrub(body)


def send(urls: list[str], title: str, body: str, kind: str = "info") -> bool:
    """Send one message to every URL; True when all took it. Never raises: a notification
    must not stop or fail the run it reports on."""
    if not urls:
        return True
    try:
        import apprise

        protect(urls)
        sender = apprise.Apprise()
        for url in urls:
            sender.add(url)
        ok = bool(sender.notify(title=title, body=body, notify_type=kind))
    except Exception as exc:  # noqa: BLE001 - any fault of a courtesy message is only logged
        log.warning("notification not sent (%s: %s)", type(exc).__name__, scrub(str(exc)))
        return False
    if not ok:
        shown = ", ".join(s.url(privacy=True) for s in sender)
        log.warning("notification not delivered to every URL (%s); the run is unaffected",
                    scrub(shown))
    return ok


def notify_end(urls: list[str], report: Report, code: int, reason: str = "") -> bool:
    """The message for a session that ended with `code`, sent to `urls`."""
    title, body = compose(report, code, reason)
    return send(urls, title, body, EVENTS.get(code, ("", "failure"))[1])
