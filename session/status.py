"""`agent.py status`: where a run stands, read from the store alone.

Status never takes the lease and never writes: it reads spec, HEAD, lease, the session
records and HEAD's cursor.json, so it works from any machine, even while an agent trains.
Reads are not one snapshot; an agent committing meanwhile can make HEAD newer than a
session record, which is harmless for a report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from baton.state_schema import Cursor, Head, Lease, RunSpec, SchemaError, SessionRecord, utcnow

from baton.handoff import Store, StoreConfigError, StoreError, open_store
from baton.handoff.runstore import RunStore, parse_checkpoint_id

from .card import gpu_hours_text, num_text, percent, save_png, utc_short, write_page
from .codes import DEFAULT_SESSION_LIMIT_S, FAILED, INVALID, OK, PAUSED
from .goodput import plot_timings, run_fields, session_fields, time_table
from .probe import kernels_text


class RunNotFoundError(StoreError):
    """The store holds no run of that name."""


def list_checkpoints(rs: RunStore) -> list[dict[str, Any]]:
    """Checkpoint folders in the store, oldest first; `complete` once the manifest is there."""
    prefix = rs.key("checkpoints") + "/"
    with_manifest = {k[len(prefix):].split("/", 1)[0]
                     for k in rs.store.list(prefix) if k.endswith("/manifest.json")}
    rows = []
    for cid in rs.list_checkpoints():
        step, gen = parse_checkpoint_id(cid)
        rows.append({"id": cid, "step": step, "generation": gen,
                     "complete": cid in with_manifest})
    return rows


def read_cursor(rs: RunStore, head: Optional[Head]) -> Optional[Cursor]:
    """The cursor of the checkpoint HEAD names: one small file, never the adapter."""
    if head is None or head.checkpoint is None:
        return None
    key = rs.checkpoint_key(head.checkpoint, "cursor.json")
    found = rs.store.read_optional(key)
    return None if found is None else Cursor.from_json(found.data, source=f"{rs.store.uri}/{key}")


def _iso(value: Optional[datetime]) -> Optional[str]:
    return None if value is None else value.isoformat()


def run_state(head: Optional[Head], cursor: Optional[Cursor], lease: Optional[Lease],
              sessions: list[SessionRecord]) -> str:
    """finished beats running: a finished run's last agent may still be releasing its lease."""
    if (head is not None and head.finished) or (cursor is not None and cursor.finished):
        return "finished"
    if lease is not None and lease.live():
        return "running"
    if (head is None or head.checkpoint is None) and not sessions:
        return "new"
    return "paused"


def session_row(rec: SessionRecord) -> dict[str, Any]:
    return {
        "session_id": rec.session_id, "host": rec.host, "gpu": rec.gpu,
        "gpu_count": rec.gpu_count, "started": _iso(rec.started), "ended": _iso(rec.ended),
        "start_step": rec.start_step, "end_step": rec.end_step, "steps": rec.steps,
        "tokens_per_s": round(rec.tokens_per_s, 1), "kernels": rec.kernels,
        "attention": rec.attention, "padding_free": rec.padding_free,
        "kernels_unfused": rec.kernels_unfused,
        "kernels_probe": rec.kernels_probe,
        "precision": rec.precision, "skipped_steps": rec.skipped_steps,
        "exit_code": rec.exit_code, **session_fields(rec),
    }


def lease_row(lease: Optional[Lease]) -> Optional[dict[str, Any]]:
    if lease is None:
        return None
    return {"holder": lease.holder, "host": lease.host, "gpu": lease.gpu,
            "generation": lease.generation, "expires_at": _iso(lease.expires_at),
            "released": lease.released, "live": lease.live()}


def sessions_left(sessions: list[SessionRecord], step: int, total: Optional[int],
                  session_limit_s: Optional[float]) -> Optional[int]:
    """Sessions still needed: remaining steps over the steps one session can do.

    steps a session = measured steps/s (over training seconds) x the share of a session's wall
    time spent training x the session length. The length is the given limit, else the longest
    session that ended paused (it ran to its limit), else 12 h."""
    if total is None:
        return None
    if step >= total:
        return 0
    ended = [r for r in sessions if r.ended is not None and r.train_seconds > 0]
    steps, train_s = sum(r.steps for r in ended), sum(r.train_seconds for r in ended)
    wall = sum((r.ended - r.started).total_seconds() for r in ended)
    if steps <= 0 or train_s <= 0 or wall <= 0:
        return None
    paused = [(r.ended - r.started).total_seconds() for r in ended if r.exit_code == PAUSED]
    length = session_limit_s or (max(paused) if paused else DEFAULT_SESSION_LIMIT_S)
    per_session = steps / train_s * min(train_s / wall, 1.0) * length
    return math.ceil((total - step) / per_session) if per_session > 0 else None


def _last(points: list[tuple[int, float]]) -> Optional[float]:
    return points[-1][1] if points else None


@dataclass
class RunView:
    """Everything status reads from the store, once."""

    run: str
    store_uri: str
    spec: Optional[RunSpec]
    head: Optional[Head]
    lease: Optional[Lease]
    sessions: list[SessionRecord]
    cursor: Optional[Cursor]
    checkpoints: list[dict[str, Any]]

    def losses(self) -> list[tuple[int, float]]:
        points = [tuple(p) for r in self.sessions for p in r.losses]
        return points or [tuple(p) for p in (self.cursor.losses if self.cursor else [])]

    def eval_losses(self) -> list[tuple[int, float]]:
        return [tuple(p) for r in self.sessions for p in r.eval_losses]

    def base_eval_loss(self) -> Optional[float]:
        """The base model's eval loss, measured before step 1 (cursor, else a session record)."""
        if self.cursor is not None and self.cursor.base_eval_loss is not None:
            return self.cursor.base_eval_loss
        found = [r.base_eval_loss for r in self.sessions if r.base_eval_loss is not None]
        return found[0] if found else None


def gather(store: Store, run: str) -> RunView:
    """Read the run's documents; RunNotFoundError when the store has no such run."""
    rs = RunStore(store, run)
    spec = rs.read_spec()
    head = (rs.read_head() or (None, None))[0]
    if spec is None and head is None:
        raise RunNotFoundError(
            f"no run {run!r} in store {store.uri}: check --run and --store "
            "(the run is created by the first `agent.py run`)")
    return RunView(
        run=run, store_uri=store.uri, spec=spec, head=head,
        lease=(rs.read_lease() or (None, None))[0],
        sessions=rs.read_sessions(), cursor=read_cursor(rs, head),
        checkpoints=list_checkpoints(rs),
    )


def summarize(view: RunView, *, session_limit_s: Optional[float] = None) -> dict[str, Any]:
    """The `status --json` object of a gathered run."""
    cursor, head, spec = view.cursor, view.head, view.spec
    step = cursor.step if cursor else (head.step if head else 0)
    total = cursor.total_steps if cursor else (spec.train.max_steps if spec else None)
    return {
        "run": view.run, "store": view.store_uri,
        "state": run_state(head, cursor, view.lease, view.sessions),
        "model": spec.model.name if spec else None,
        "step": step, "total_steps": total,
        "epoch": cursor.epoch if cursor else 0,  # 0-based index of the epoch in progress
        "epoch_position": cursor.epoch_position if cursor else 0,  # its samples consumed
        "samples_seen": cursor.samples_seen if cursor else 0,
        "tokens_seen": cursor.tokens_seen if cursor else 0,
        "skipped_steps": cursor.skipped_steps if cursor else 0,  # fp16 overflows, no update
        "skipped_samples": cursor.skipped_samples if cursor else 0,  # consumed, not trained
        "checkpoint": head.checkpoint if head else None,
        "generation": head.generation if head else 0,
        "lease": lease_row(view.lease),
        "sessions": [session_row(r) for r in view.sessions],
        "loss": (cursor.loss if cursor and cursor.loss is not None else _last(view.losses())),
        "eval_loss": (cursor.eval_loss if cursor and cursor.eval_loss is not None
                      else _last(view.eval_losses())),
        "base_eval_loss": view.base_eval_loss(),
        # classification runs: the share of eval records the checkpoint's model gets right
        "eval_accuracy": cursor.eval_accuracy if cursor else None,
        "checkpoints": view.checkpoints,
        "sessions_left_estimate": sessions_left(view.sessions, step, total, session_limit_s),
        **run_fields(view.sessions),  # goodput, gpu_hours (session/goodput.py)
        "checked_at": _iso(utcnow()),
    }


def collect_status(store: Store, run: str, *,
                   session_limit_s: Optional[float] = None) -> dict[str, Any]:
    """The `status --json` object of `run`; RunNotFoundError when the store has no such run."""
    return summarize(gather(store, run), session_limit_s=session_limit_s)


def plot_losses(view: RunView, path: Path) -> Path:
    """Training (and eval) loss over steps, a dashed line where each later session began."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a notebook VM or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        train = view.losses()
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1.2)
        evals = view.eval_losses()
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2)
        base = view.base_eval_loss()
        if base is not None:  # the yardstick: below it, the adapter helps on held-out data
            ax.axhline(base, color="tab:red", linestyle=":", linewidth=1.0,
                       label=f"base model eval loss ({base:.3f})")
        for i, rec in enumerate(view.sessions[1:], start=2):
            ax.axvline(rec.start_step, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"session {i}", (rec.start_step, 1), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=8, color="grey")
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"run {view.run}")
        if train or evals:
            ax.legend()
        return save_png(fig, path)
    finally:
        plt.close(fig)


def render(status: dict[str, Any], console=None) -> None:
    """The status as rich tables for a person."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    summary = Table(title=f"Run {status['run']} in {status['store']}", show_header=False)
    total = status["total_steps"]
    done = f" ({100 * status['step'] / total:.1f}%)" if total else ""
    lease = status["lease"]
    for label, value in [
        ("state", status["state"]), ("model", status["model"] or "-"),
        ("step", f"{status['step']:,} / {num_text(total)}{done}"),
        ("epoch (from 0)", f"{status['epoch']}, {status['epoch_position']:,} samples in"),
        ("samples seen", num_text(status["samples_seen"]) + (
            f" (+{status['skipped_samples']:,} skipped, not trained)"
            if status.get("skipped_samples") else "")),
        ("tokens seen", num_text(status["tokens_seen"])),
        ("loss", num_text(status["loss"], "{:.4f}")), ("eval loss", _eval_text(status)),
        ("checkpoint", status["checkpoint"] or "-"),
        ("kernels", _last_kernels(status["sessions"])),
        ("lease", "-" if lease is None else
         f"{lease['host']} ({lease['gpu']}) until {utc_short(lease['expires_at'])} UTC"
         f"{' live' if lease['live'] else ' (released or expired)'}"),
        ("sessions left (estimate)", num_text(status["sessions_left_estimate"])),
        ("goodput (training / wall-clock)", percent(status["goodput"])),
        ("GPU-hours", gpu_hours_text(status["gpu_hours"])),
    ]:
        summary.add_row(label, value)
    console.print(summary)
    if status["sessions"]:
        console.print(_sessions_table(status["sessions"]))
        if any(s["timings"] for s in status["sessions"]):
            console.print(time_table(status["sessions"]))


def _last_kernels(sessions: list[dict[str, Any]]) -> str:
    """The last session's kernel path: 'reference (probe: lora_mlp killed by SIGABRT)'."""
    if not sessions:
        return "-"
    last = sessions[-1]
    text = kernels_text(last["kernels"], last.get("kernels_probe"))
    # The ops the model's family keeps unfused (kernels/patch.py), e.g. GLM-4's rope.
    return text + (f"; unfused: {last['kernels_unfused']}" if last.get("kernels_unfused") else "")


def _eval_text(status: dict[str, Any]) -> str:
    """'1.4900, base 1.7000': an eval loss means little without the base model's."""
    text, base = num_text(status["eval_loss"], "{:.4f}"), status.get("base_eval_loss")
    text = text if base is None else f"{text}, base {base:.4f}"
    accuracy = status.get("eval_accuracy")
    return text if accuracy is None else f"{text}; accuracy {accuracy:.3f}"


def _span(started: Optional[str], ended: Optional[str]) -> str:
    """'12-01 00:13-01:25': the end's day only when it differs (UTC)."""
    begin, end = utc_short(started), utc_short(ended)
    if not end:
        return f"{begin}-running"
    return f"{begin}-{end[6:] if end[:5] == begin[:5] else end}"


def _sessions_table(rows: list[dict[str, Any]]):
    """One line a session, narrow enough for an 80-column notebook cell."""
    from rich import box
    from rich.table import Table

    table = Table(title="Sessions (times in UTC)", box=box.SIMPLE, pad_edge=False)
    for col in ("machine", "when", "steps", "tok/s", "path", "exit"):
        table.add_column(col, no_wrap=True)
    for s in rows:
        gpu = f"{s['gpu']} x{s['gpu_count']}" if s["gpu_count"] > 1 else s["gpu"]
        steps = f"{s['start_step']}->{s['end_step']}"
        if s["skipped_steps"]:
            steps += f" ({s['skipped_steps']} skipped)"
        table.add_row(f"{s['host']} {gpu}", _span(s["started"], s["ended"]), steps,
                      f"{s['tokens_per_s']:,.0f}", _path(s),
                      num_text(s["exit_code"]))
    return table


def _path(s: dict[str, Any]) -> str:
    """Precision and kernels of a session, its attention below ("fp16 triton" over
    "sdpa_spans"; padded rows say so: "sdpa padded"), so the table stays 80 columns wide."""
    layout = "" if s.get("padding_free") else " padded"
    kernels = kernels_text(s['kernels'], s.get('kernels_probe'))
    return f"{s['precision']} {kernels}\n{s.get('attention', 'sdpa')}{layout}"


def _write_html(store: Store, view: RunView, status: dict[str, Any], out: Path) -> Path:
    """`--html`: the run's page (session/card.py) with this view's loss plot inlined."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="baton-page-") as tmp:
        plot_png = plot_losses(view, Path(tmp) / "loss.png").read_bytes()
        bars = plot_timings(status["sessions"], Path(tmp) / "time.png")
        time_png = bars.read_bytes() if bars is not None else None
    return write_page(store, status, plot_png, out, time_png=time_png)


def status_main(store_uri: str, run: str, *, as_json: bool, plot: Optional[Path],
                html: Optional[Path] = None) -> int:
    """Entry point of `agent.py status`: 0, or 2 when the store or run cannot be found or read,
    1 when the store stays unreachable."""
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    store = None
    try:
        store = open_store(store_uri)
        view = gather(store, run)
        status = summarize(view)
        if plot is not None:
            status["plot"] = str(plot_losses(view, plot))
        if html is not None:
            status["html"] = str(_write_html(store, view, status, html))
    except (RunNotFoundError, StoreConfigError, SchemaError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return INVALID
    except StoreError as exc:
        err.print(f"[red]error:[/red] cannot read run {run!r} from {store_uri}: {exc}")
        return FAILED
    except OSError as exc:  # --plot or --html names a place this machine cannot write
        err.print(f"[red]error:[/red] cannot write {exc.filename or 'the output'}: "
                  f"{exc.strerror or exc}; pass a path in a writable folder")
        return INVALID
    finally:
        if store is not None:
            store.close()
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        render(status)
        if plot is not None:
            Console().print(f"loss plot written to {status['plot']}")
        if html is not None:
            Console().print(f"the run's page written to {status['html']}")
    return OK
