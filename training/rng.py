"""RNG states of torch (CPU and CUDA) and Python, as base64 text for the cursor.

LoRA dropout draws from torch's RNG; restoring it makes a resumed step drop the same units
as the uninterrupted run would have.
"""

from __future__ import annotations

import base64
import json
import random

import torch


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def capture() -> dict[str, str]:
    states = {"torch": _b64(torch.get_rng_state().numpy().tobytes()),
              "python": _b64(json.dumps(random.getstate()).encode())}
    if torch.cuda.is_available():
        states["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return states


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def restore(states: dict[str, str]) -> None:
    """Restore what was captured; a state for a device this machine lacks is skipped."""
    if "torch" in states:
        torch.set_rng_state(_tensor(states["torch"]))
    if "python" in states:
        # JSON, not pickle: a cursor from a shared store must never be able to run code.
        version, internal, gauss = json.loads(base64.b64decode(states["python"]))
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(states["cuda"]))
