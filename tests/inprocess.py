"""`agent.py run` inside the test process: the CLI's own parsing and validation, then the
session itself, without the 8-15 s of a fresh interpreter importing torch and transformers.

For tests that need a session's whole path (lease, pull, train, commit, record, release) but
not a process of its own (no signals, kill points or ranks). The hooks tests/faults.py
installs by environment in a subprocess are installed here with pytest's monkeypatch.
"""

from __future__ import annotations

from pathlib import Path


def run_session_here(config: Path, workdir: Path, *flags: str) -> int:
    """The exit code of one session of `config`, run in this process."""
    import agent
    from baton.session.loop import SessionOptions, run_session

    args = agent.build_parser().parse_args(
        ["run", "--config", str(config), "--workdir", str(workdir), "--log-every", "0", *flags])
    return run_session(agent.load_config(args),
                       SessionOptions(workdir=args.workdir, log_every=args.log_every))
