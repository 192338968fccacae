"""Helpers shared by the checkpoint, race and store-fault tests."""

from __future__ import annotations

import os
from pathlib import Path

from baton.state_schema import Cursor


def make_checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint folder shaped like the agent's: adapter, its config, the cursor."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(2048) + step.to_bytes(4, "big"))
    (folder / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (folder / "cursor.json").write_bytes(Cursor(step=step, total_steps=100).to_json())
    return folder
