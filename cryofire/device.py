"""Choosing the compute device."""

from __future__ import annotations

import torch

from cryofire.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device when one is present, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name!r} is not a device name ('auto', 'cpu', 'cuda', 'cuda:1')") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use 'auto' or 'cpu')")
    return device
