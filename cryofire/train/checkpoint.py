"""Self-describing checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint holds the model and optimizer states, the full run configuration (plain types), the epoch and image
counters and the random-number state, so that a killed run resumes to the same result, and analysis can rebuild the
model from the file alone. Everything in it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cryofire.errors import InputError


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain types only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as error:
        raise InputError(path, "checkpoint not found") from error
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise InputError(path, f"not a readable cryofire checkpoint ({type(error).__name__}: {error})") from error
