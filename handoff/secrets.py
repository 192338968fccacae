"""The one secret scrubber: every path that writes text a person or a file may keep (log
records, messages, tracebacks, store error texts) passes through `scrub`.

The secrets are the stores' credentials, so they live with the stores; the session layer and
the scripts import this module rather than keep their own patterns.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable

# Environment variables whose values must never reach a log line, a message or a file.
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "KAGGLE_KEY", "KAGGLE_API_TOKEN")
# A Hub token, or 40 base64 characters mixing cases and digits (an AWS secret key; a git
# commit id is hex, lowercase, and stays readable). Twenty characters after "hf_": real tokens
# have 34, and a shorter bound would eat names such as "hf_transfer" in library messages.
SECRET_SHAPES = re.compile(
    r"hf_[A-Za-z0-9]{20,}"
    r"|(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]{0,39}[A-Z])(?=[A-Za-z0-9/+]{0,39}[a-z])"
    r"(?=[A-Za-z0-9/+]{0,39}[0-9])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words
# Secrets that live in no environment variable (notification URLs, which carry their tokens
# in the URL itself): registered once by their owner, scrubbed from every text after that.
_REGISTERED: set[str] = set()


def register_secret(value: str) -> None:
    """Scrub `value` from every later text, as if it were one of SECRET_VARS."""
    if isinstance(value, str) and len(value) >= MIN_SECRET_LEN:
        _REGISTERED.add(value)


def scrub(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every known secret (the environment's, the registered ones, plus `extra`: a
    token a client found elsewhere) replaced by its name, and anything shaped like a
    credential redacted."""
    for name in SECRET_VARS:
        value = os.environ.get(name)
        if value and len(value) >= MIN_SECRET_LEN:
            text = text.replace(value, f"<{name}>")
    # Longest first: a whole URL goes before the token inside it.
    found = [v for v in (*_REGISTERED, *extra) if isinstance(v, str)]
    for value in sorted(found, key=len, reverse=True):
        if len(value) >= MIN_SECRET_LEN:
            text = text.replace(value, "<redacted>")
    return SECRET_SHAPES.sub("<redacted>", text)


class ScrubFilter(logging.Filter):
    """Scrubs log records of every library (boto3, huggingface_hub) before they are written."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = ()
        return True
