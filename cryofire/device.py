"""Choosing the compute device, and keeping the host allocator from returning memory to the OS."""

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


def keep_freed_memory() -> None:
    """Ask glibc to keep freed large blocks for reuse instead of returning them to the OS at once.

    Every batch allocates tens of MB of temporaries; by default glibc unmaps each on free and the next batch
    page-faults them in again, which cost about half of a D=64 training step and a fifth of the ab initio's searches
    (bench/RESULTS.md, "Page faults"). Peak memory grows, as freed blocks are kept: 1.8 -> 2.6 GB for D=64
    training, 2.6 -> 10.2 GB for the D=32 ab initio of 10,000 images (bench/RESULTS.md, eleventh session).
    Process-wide; called by the command line (and the benchmarks) before any work, not by the library. No-op where
    the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)
