"""Atomic file output: write to a temporary sibling, then rename over the target.

A reader never sees a half-written file: either the old file (or none) or the complete new one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: str | Path) -> Path:
    """Create an empty, uniquely named temporary file in the folder of ``path`` and return its path.

    Being in the same folder (hence the same file system) makes the final ``os.replace`` atomic.
    The file is created with the usual permissions (umask applied), as the final file should be.
    """
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(temporary, "xb"):
        pass
    return temporary


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on success rename it to ``path``, on error delete it."""
    temporary = temporary_sibling(path)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
