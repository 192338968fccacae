"""The run's page for a checkpoint commit on the Hub (card.py renders it, status.py reads
the state it shows). Its own module so that status.py, which writes `--html` through card.py,
never imports what imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .card import AdapterPlace, card_markdown

# Files of a checkpoint folder that are the run's bookkeeping, not part of the adapter.
NOT_ADAPTER = {"cursor.json", "optimizer.safetensors", "manifest.json"}


class HubPage:
    """The page's files for one checkpoint commit on the Hub: README.md (the card), the loss
    plot, and on finish the final adapter at `<run>/final/`. Built in the upload thread from
    the checkpoint's own cursor and the session's record, so it shows the state the commit
    creates; the card's commit is the checkpoint's, never one more."""

    def __init__(self, runstore, spec, record, workdir: Path):
        self.runstore, self.spec, self.record = runstore, spec, record
        self.out = Path(workdir) / "page"
        self.prior: Optional[list] = None  # earlier sessions: read once, they cannot change

    def status(self, folder: Path, cid: str, finished: bool, last: bool) -> tuple[dict, Any]:
        from baton.state_schema import Cursor, Head

        from .status import RunView, summarize

        if self.prior is None:
            self.prior = [r for r in self.runstore.read_sessions()
                          if r.session_id != self.record.session_id]
        # A copy: the training thread appends to the record's losses meanwhile.
        record = self.record.model_copy(deep=True)
        cursor = Cursor.from_json((folder / "cursor.json").read_bytes(), source=str(folder))
        head = Head(checkpoint=cid, step=cursor.step, generation=0, finished=finished)
        view = RunView(run=self.runstore.run, store_uri=self.runstore.store.uri, spec=self.spec,
                       head=head, lease=None, sessions=[*self.prior, record], cursor=cursor,
                       checkpoints=[])
        status = summarize(view)
        if status["state"] != "finished":  # this agent holds the lease until its last commit
            status["state"] = "paused" if last else "running"
        return status, view

    def files(self, folder: Path, cid: str, finished: bool, last: bool) -> dict[str, Path]:
        """Store key -> local file, for `commit_checkpoint(extra=...)`."""
        from .goodput import plot_timings
        from .status import plot_losses

        status, view = self.status(folder, cid, finished, last)
        self.out.mkdir(parents=True, exist_ok=True)
        plot = plot_losses(view, self.out / "loss.png")
        bars = plot_timings(status["sessions"], self.out / "time.png")
        store = self.runstore.store
        where = AdapterPlace(status, repo_id=getattr(store, "repo_id", None),
                             base=getattr(store, "base", ""))
        card = self.out / "README.md"
        card.write_text(card_markdown(status, f"{self.runstore.run}/loss.png", where,
                                      time_ref=f"{self.runstore.run}/time.png" if bars else None))
        files = {"README.md": card, self.runstore.key("loss.png"): plot}
        if bars is not None:
            files[self.runstore.key("time.png")] = bars
        if finished:  # the adapter again, at a path that never changes
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name not in NOT_ADAPTER:
                    files[self.runstore.key("final", path.name)] = path
        return files
