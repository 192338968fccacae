"""The run's page: a model card for the Hub repo, and the same page as one HTML file.

On an `hf://` store every checkpoint commit also carries `README.md` (this card) and the loss
plot, in the same commit (handoff/checkpoint.py `extra`), so the repo's web page shows the run
from any browser at no cost in commits. `agent.py status --html` writes the same content, with
the plot inlined, for any store.

The card is built from the `status --json` object (session/status.py), so the page and status
never disagree on what a run's state is; session/page.py builds it for a checkpoint commit.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Optional


def save_png(fig, path) -> Path:
    """Write a matplotlib figure as the PNG at `path` (its folder made): the loss plot, the
    time bars and the confusion matrix all leave through here, alike."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def num_text(value: Optional[float], fmt: str = "{:,}") -> str:
    """A number as the page and `status` show it; '-' when there is none."""
    return "-" if value is None else fmt.format(value)


def utc_short(iso: Optional[str]) -> str:
    """'2026-11-23T17:25:31.5+00:00' -> '11-23 17:25' (UTC): fits a narrow terminal."""
    return "" if not iso else iso[5:16].replace("T", " ")


def percent(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def seconds_text(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 600 else f"{value / 60:.0f} min"


def gpu_hours_text(hours: dict[str, Any]) -> str:
    """'Tesla T4 3.20 h, NVIDIA L4 1.00 h; total 4.20 h', or '-' without GPU sessions."""
    if not hours["by_kind"]:
        return "-"
    kinds = ", ".join(f"{kind} {h:.2f} h" for kind, h in hours["by_kind"].items())
    return f"{kinds}; total {hours['total']:.2f} h"


TAGS = ["baton", "qlora", "lora", "peft"]
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
STATE_NOTE = {
    "new": "new: no step trained yet",
    "running": "running: a session is training now",
    "paused": "paused: start the next session to continue",
    "finished": "finished",
}


def front_matter(base_model: Optional[str]) -> str:
    """The Hub's YAML metadata. `base_model` only when it is a Hub id (a local folder path
    would make the Hub's metadata check fail)."""
    import yaml

    meta: dict[str, Any] = {}
    if base_model and HUB_ID.match(base_model):
        meta["base_model"] = base_model
    meta.update({"library_name": "peft", "tags": TAGS})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _cell(value: Any) -> str:
    """A table cell: no raw HTML (a host name is text), no column breaks."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def state_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows of the run's state: the same facts as `status`."""
    total = status.get("total_steps")
    done = f" ({100 * status['step'] / total:.1f}%)" if total else ""
    rows = [
        ("state", STATE_NOTE.get(status["state"], status["state"])),
        ("base model", status.get("model") or "-"),
        ("step", f"{status['step']:,} of {num_text(total)}{done}"),
        ("epoch (from 0)", f"{status.get('epoch', 0)}, {status.get('epoch_position', 0):,} "
                           "samples in"),
        ("tokens seen", num_text(status.get("tokens_seen"))),
        ("loss", num_text(status.get("loss"), "{:.4f}")),
        ("eval loss", num_text(status.get("eval_loss"), "{:.4f}")),
    ]
    if status.get("base_eval_loss") is not None:  # the untrained model's, when measured
        rows.append(("base eval loss", num_text(status["base_eval_loss"], "{:.4f}")))
    rows += [("checkpoint", status.get("checkpoint") or "-"),
             ("sessions left (estimate)", num_text(status.get("sessions_left_estimate"))),
             ("goodput (training / wall-clock)", percent(status.get("goodput"))),
             ("GPU-hours", gpu_hours_text(status.get("gpu_hours") or {"by_kind": {}})),
             ("updated (UTC)", utc_short(status.get("checked_at")) or "-")]
    return rows


def sessions_table(sessions: list[dict[str, Any]]) -> str:
    lines = ["| # | machine | GPU | started (UTC) | steps | tokens/s | kernels | goodput | tail "
             "| exit |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(sessions, start=1):
        gpu = f"{s['gpu']} x{s['gpu_count']}" if s.get("gpu_count", 1) > 1 else s["gpu"]
        cells = [i, s["host"], gpu, utc_short(s["started"]),
                 f"{s['start_step']} → {s['end_step']}",
                 f"{s['tokens_per_s']:,.0f}", s["kernels"], percent(s.get("goodput")),
                 seconds_text(s.get("tail_s")),
                 "running" if s["exit_code"] is None else s["exit_code"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def usage(status: dict[str, Any], where: "AdapterPlace") -> str:
    """How to load the adapter with PEFT, pointing at the right folder."""
    base = status.get("model") or "BASE_MODEL"
    if where.repo_id:
        load = (f'model = PeftModel.from_pretrained(base, "{where.repo_id}", '
                f'subfolder="{where.subfolder}")')
    elif where.local:
        load = f'model = PeftModel.from_pretrained(base, "{where.local}")'
    else:  # S3: the folder must be downloaded first
        load = (f'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")  # a copy of '
                f'{where.subfolder}/')
    if status["state"] == "finished" and where.has_final:
        note = (f"The run is finished: the final adapter is at `{where.final}/`, a path that "
                "stays the same from now on.")
    elif status["state"] == "finished":  # a store without a page keeps it in its checkpoint
        note = f"The run is finished: its adapter is the last checkpoint, `{where.subfolder}/`."
    else:
        note = (f"The run is not finished: this loads the latest checkpoint, "
                f"`{where.subfolder}/`, whose name changes with every checkpoint (older ones "
                "are pruned).")
        if where.has_final:
            note += f" When the run finishes, the final adapter is placed at `{where.final}/`."
    return "\n".join([
        "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
        "", f'base = AutoModelForCausalLM.from_pretrained("{base}")', load, "```", "", note,
        "To fold it into the base model: `python scripts/merge.py --store STORE --run "
        f"{status['run']} --out merged/`."])


class AdapterPlace:
    """Where the adapter of a run's page lives: a Hub repo and subfolder, or a local folder."""

    def __init__(self, status: dict[str, Any], *, repo_id: Optional[str] = None,
                 base: str = "", local_root: Optional[Path] = None, has_final: bool = True):
        run = status["run"]
        self.repo_id, self.has_final = repo_id, has_final
        self.final = f"{base}{run}/final"
        latest = f"{base}{run}/checkpoints/{status.get('checkpoint') or 'CHECKPOINT'}"
        finished = status["state"] == "finished"
        self.subfolder = self.final if finished and has_final else latest
        self.local = str(local_root / self.subfolder) if local_root is not None else None


def card_markdown(status: dict[str, Any], plot_ref: Optional[str], where: AdapterPlace,
                  *, metadata: bool = True, time_ref: Optional[str] = None) -> str:
    """The model card: metadata, state table, sessions (and where their time went), loss
    plot, how to load the adapter."""
    parts = [front_matter(status.get("model"))] if metadata else []
    parts += [f"# {status['run']}: a QLoRA adapter trained with Baton", "",
              f"Base model: `{status.get('model') or '-'}`. This page is rewritten with every "
              "checkpoint of the run.", "",
              "| | |", "|---|---|"]
    parts += [f"| {_cell(k)} | {_cell(v)} |" for k, v in state_rows(status)]
    if status.get("sessions"):
        parts += ["", "## Sessions", "", sessions_table(status["sessions"])]
    if time_ref:
        parts += ["", f"![where each session's time went]({time_ref})"]
    if plot_ref:
        parts += ["", "## Loss", "", f"![loss curve of {status['run']}]({plot_ref})"]
    parts += ["", "## Use the adapter", "", usage(status, where), ""]
    return "\n".join(parts)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }}
img {{ max-width: 100%; }}
pre {{ background: #f5f5f5; padding: .8rem; overflow-x: auto; }}
</style></head>
<body>
{body}
</body></html>
"""


def _inline(png: Optional[bytes]) -> Optional[str]:
    return ("data:image/png;base64," + base64.b64encode(png).decode()) if png else None


def page_html(status: dict[str, Any], plot_png: Optional[bytes], where: AdapterPlace,
              time_png: Optional[bytes] = None) -> str:
    """The card as one self-contained HTML file: no metadata block, the plots inlined."""
    import markdown

    text = card_markdown(status, _inline(plot_png), where, metadata=False,
                         time_ref=_inline(time_png))
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    return PAGE.format(title=html.escape(f"Baton run {status['run']}"), body=body)


def write_page(store, status: dict[str, Any], plot_png: Optional[bytes], out: Path,
               time_png: Optional[bytes] = None) -> Path:
    """`status --html`: the run's page for any store as one file, the plot inlined."""
    root = getattr(store, "root", None)
    where = AdapterPlace(status, repo_id=getattr(store, "repo_id", None),
                         base=getattr(store, "base", ""),
                         local_root=Path(root) if root is not None else None,
                         has_final=store.shows_page)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page_html(status, plot_png, where, time_png), encoding="utf-8")
    return out
