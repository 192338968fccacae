#!/usr/bin/env python
"""Baton's command line: `run` a session of a fine-tune, show its `status`, `plan` it.

    python agent.py run    --config run.yaml [--store URI] [--run NAME] [--session-limit 12h]
                           [--session-start ISO|now] [--takeover] [--micro-batch-size N]
                           [--precision auto|fp32|fp16|bf16] [--[no-]padding-free]
                           [--workdir DIR] [--log-every SECONDS] [--notify URL]
    python agent.py status --store URI --run NAME [--json] [--plot loss.png] [--html OUT.html]
    python agent.py plan   --config run.yaml [--json] [--tokens-per-s N]

The config is read and validated before anything heavy is imported, so a typo costs a second,
not a minute of loading torch. Exit codes of `run`: 0 finished, 75 paused (run again), 73 the
lease is held by another agent, 2 invalid input, 1 an unexpected error. On a machine with
several GPUs, `run` starts one process a GPU (data-parallel); rank 0's exit code is returned.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from baton.handoff.secrets import ScrubFilter, scrub
from baton.session.codes import FAILED, INVALID, PAUSED
from baton.session.quiet import silence_bnb_kernel_notice

class ConfigError(ValueError):
    """The config or the flags are wrong; the message says which key and how to fix it."""


# -- output: every path scrubbed of secrets (handoff/secrets.py) ---------------------------

def install_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler],
                        force=True)
    logging.getLogger("baton").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # library warnings pass the scrubber too
    sys.excepthook = _scrubbed_excepthook
    threading.excepthook = lambda a: _scrubbed_excepthook(a.exc_type, a.exc_value,
                                                          a.exc_traceback)


def _scrubbed_excepthook(exc_type, exc, tb) -> None:
    """Tracebacks that escape (other threads, interpreter exit) are scrubbed as well."""
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    print(scrub(text), file=sys.stderr, flush=True)


def fail(message: str) -> None:
    print(scrub(f"baton: {message}"), file=sys.stderr, flush=True)


# -- config ------------------------------------------------------------------------------

def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config with the path of run.yaml")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} should hold a mapping of keys (run:, store:, model:, ...), "
                          f"found {type(doc).__name__}")
    return doc


def apply_overrides(doc: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags win over the file (DESIGN.md: 'command-line flags override')."""
    flat = {("store",): args.store, ("run",): args.run,
            ("session", "limit"): args.session_limit, ("session", "start"): args.session_start,
            ("train", "micro_batch_size"): args.micro_batch_size,
            ("train", "precision"): args.precision,
            ("data", "padding_free"): args.padding_free}
    for path, value in flat.items():
        if value is None:
            continue
        node = doc
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(node, dict):  # else validation names the malformed section
            node[path[-1]] = value
    if getattr(args, "notify", None):  # --notify adds to the file's URLs
        listed = doc.get("notify")
        doc["notify"] = [*(listed if isinstance(listed, list) else []), *args.notify]
    return doc


def describe_errors(exc, path: Path) -> str:
    """pydantic's ValidationError as one line a key, each with what to do."""
    lines = [f"{path} has {exc.error_count()} problem(s):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or fix its spelling "
                         "(DESIGN.md lists every key)")
        elif err["type"] == "missing":
            lines.append(f"  {key}: required; add it to the config")
        else:
            given = err.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {key or 'config'}: {err['msg']}{shown}")
    return "\n".join(lines)


def resolve_paths(doc: dict[str, Any], base: Path) -> None:
    """Relative data paths are relative to the config file, as in most tools' configs; the
    working directory is tried second so `--config sub/run.yaml` with cwd paths still works."""
    model = doc.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str):
        name = Path(model["name"]).expanduser()
        # A local model folder is pinned by absolute path; a Hub id ("org/name") is left alone.
        for candidate in (base / name, name):
            if not name.is_absolute() and candidate.is_dir():
                model["name"] = str(candidate.resolve())
                break
    data = doc.get("data")
    if not isinstance(data, dict):
        return
    hub = str(data.get("train", "")).startswith("hf://")
    for key in ("train", "eval"):
        value = data.get(key)
        if hub and (key == "train" or not Path(str(value)).suffix):
            continue  # a Hub dataset, or one of its splits by name: not a path
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            beside = base / value
            if beside.exists() or not Path(value).exists():
                data[key] = str(beside)


def load_config(args: argparse.Namespace):
    """run.yaml plus flags -> a validated RunConfig; ConfigError says what to fix."""
    from pydantic import ValidationError

    from baton.state_schema import RunConfig

    path = Path(args.config).expanduser()
    doc = apply_overrides(read_yaml(path), args)
    resolve_paths(doc, path.resolve().parent)
    try:
        config = RunConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, path)) from None
    check_session_flags(config)
    check_notify(config)
    return config


def check_notify(config) -> None:
    """Notify URLs hold tokens: registered with the scrubber first, then checked."""
    if not config.notify:
        return
    from baton.session.notify import NotifyConfigError, check_urls

    try:
        check_urls(config.notify)
    except NotifyConfigError as exc:
        raise ConfigError(str(exc)) from None


def check_session_flags(config) -> None:
    from baton.session.clock import ClockError, parse_start

    try:
        parse_start(config.session.start)
    except ClockError as exc:
        raise ConfigError(f"session.start / --session-start: {exc}") from None


# -- commands ----------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    validated = time.time()  # the end of start-up in the session's timings
    world = ranks_wanted()
    if world > 1:
        return launch_ranks(world, args.argv, config)
    from baton.session.loop import SessionOptions, run_session  # heavy: only after validation

    options = SessionOptions(takeover=args.takeover, workdir=args.workdir,
                             log_every=args.log_every, validated_at=validated)
    return run_session(config, options)


# -- more than one GPU: one process a GPU (DDP), rank 0 speaks for the session ------------

def ranks_wanted() -> int:
    """Every visible CUDA GPU gets a rank, unless this process is already one of them.
    BATON_WORLD_SIZE forces a count (tests run 2 CPU ranks over gloo)."""
    if "RANK" in os.environ:
        return 1
    if os.environ.get("BATON_WORLD_SIZE"):
        return int(os.environ["BATON_WORLD_SIZE"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launch_ranks(world: int, argv: list[str], config) -> int:
    """One process a GPU under torch's elastic launcher (session/launch.py), each running this
    same command through the same entry script; rank 0's exit code is the session's (a pause
    stays 75), a dead rank ends the session with 1 and the lease released."""
    from baton.session.launch import launch

    return launch(world, entry_script(), argv, store=config.store, run=config.run)


def entry_script() -> str:
    """The script the ranks run: the one this process started from when it is agent.py or a
    wrapper of its main that says so with AGENT_ENTRY = True (tests/agent_entry.py, whose test
    hooks then reach every rank); agent.py itself when main() was called from elsewhere."""
    main_module = sys.modules.get("__main__")
    path = getattr(main_module, "__file__", None)
    own = Path(__file__).resolve()
    if path and (Path(path).resolve() == own or getattr(main_module, "AGENT_ENTRY", False)):
        return str(Path(path).resolve())
    return str(own)


def cmd_status(args: argparse.Namespace) -> int:
    from baton.session.status import status_main

    return status_main(args.store, args.run, as_json=args.json, plot=args.plot, html=args.html)


def cmd_plan(args: argparse.Namespace) -> int:
    config = load_config(args)
    from baton.session.plan import plan_main

    if args.tokens_per_s is not None and args.tokens_per_s <= 0:
        raise ConfigError(f"--tokens-per-s must be positive, got {args.tokens_per_s}; pass the "
                          "tokens a second a session trains, e.g. --tokens-per-s 1200")
    return plan_main(config, as_json=args.json, tokens_per_s=args.tokens_per_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train this session, then commit and pause or finish")
    run.add_argument("--config", required=True, type=Path, help="run.yaml")
    run.add_argument("--store", help="store URI: a folder, s3://bucket/prefix, hf://owner/repo")
    run.add_argument("--run", help="run name (letters, digits, - _ .)")
    run.add_argument("--session-limit", help="e.g. 12h, 90m, 60s; default: the platform's")
    run.add_argument("--session-start", help="ISO 8601 time or 'now'; default: the platform's")
    run.add_argument("--takeover", action="store_true",
                     help="take a lease that has not expired (the old session must be dead)")
    run.add_argument("--micro-batch-size", type=int, help="per-GPU batch; may change per session")
    run.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"),
                     help="this session's precision (default train.precision: auto, the GPU's "
                          "policy); may change between sessions")
    run.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=None,
                     help="this session's micro-batch layout: samples end to end without "
                          "padding (default data.padding_free: true) or --no-padding-free "
                          "for padded rows; may change between sessions")
    run.add_argument("--workdir", type=Path, help="local cache (default ~/.cache/baton/<run>)")
    run.add_argument("--log-every", type=float, default=None,
                     help="seconds between progress lines when not on a terminal (default 30)")
    run.add_argument("--notify", action="append", metavar="URL",
                     help="an apprise URL told when the session pauses, finishes or fails "
                          "(repeatable; added to run.yaml's notify:)")
    run.set_defaults(handler=cmd_run)

    status = sub.add_parser("status", help="show a run's progress, lease and sessions")
    status.add_argument("--store", required=True)
    status.add_argument("--run", required=True)
    status.add_argument("--json", action="store_true")
    status.add_argument("--plot", type=Path, help="write the loss curve to this PNG")
    status.add_argument("--html", type=Path,
                        help="write the run's page (tables and loss plot) to this HTML file")
    status.set_defaults(handler=cmd_status)

    plan = sub.add_parser("plan", help="parameters, adapter size, VRAM and steps, without weights")
    plan.add_argument("--config", required=True, type=Path)
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--tokens-per-s", type=float, default=None,
                      help="bill the run at this training speed (default: what its earlier "
                           "sessions measured)")
    for flag in ("store", "run", "session_limit", "session_start", "micro_batch_size",
                 "precision", "notify", "padding_free"):
        plan.set_defaults(**{flag: None})
    plan.set_defaults(handler=cmd_plan)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the ranks of a multi-GPU session rerun the same command
    install_logging(args.verbose)
    silence_bnb_kernel_notice()  # a bitsandbytes warning our kernels/ package causes: quiet.py
    try:
        return args.handler(args)
    except ConfigError as exc:
        fail(str(exc))
        return INVALID
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was committed")
        return PAUSED
    except Exception:  # noqa: BLE001 - the last resort: a scrubbed traceback, never a secret
        fail("unexpected error; the last committed checkpoint is intact\n"
             + traceback.format_exc())
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
