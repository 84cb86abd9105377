"""Free-space checks before writing large outputs, so that a run fails at once instead of after hours."""

from __future__ import annotations

import shutil
from pathlib import Path

from cryofire.errors import CryofireError


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in the largest unit (B, kB, MB, GB, TB; powers of 1000) that keeps it >= 1."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n_bytes) < 1000:
            return f"{n_bytes:.3g} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.3g} TB"


def require_free_space(folder: str | Path, n_bytes: int, what: str) -> None:
    """Raise CryofireError when the file system of ``folder`` has less than ``n_bytes`` bytes free.

    Args:
        folder: an existing folder on the file system that will be written to.
        n_bytes: bytes about to be written there.
        what: what will be written, for the message (e.g. "20 image stacks").
    """
    available = shutil.disk_usage(folder).free
    if available < n_bytes:
        raise CryofireError(f"{folder}: not enough disk space for {what}: {format_bytes(n_bytes)} needed, "
                            f"{format_bytes(available)} free (free some space or write to another folder)")
