"""The session layer: one `agent.py run` session (spec, lease, pull, train, commit), and the
reports that read a run (`status`, `plan`). It joins the engine (`training/`) and the store
(`handoff/`), which never import each other or this package (docs/DESIGN.md, Layers)."""
