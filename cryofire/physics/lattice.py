"""Frequency lattices and masks on centred grids.

Frequencies are in cycles per pixel, ``k = (index - D // 2) / D``, with the coordinate axis
ordered ``(kx, ky)`` / ``(kx, ky, kz)`` while arrays are indexed ``[y, x]`` / ``[z, y, x]``.
Radii named ``*_px`` are in lattice pixels (``|k| * D`` in Fourier space, distance from the box
centre ``D // 2`` in real space).
"""

from __future__ import annotations

import math

import torch


def _centred_coordinates_px(
    size: int, device: torch.device | str | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Integer offsets ``index - D // 2`` of one axis, shape (D,)."""
    dtype = dtype or torch.get_default_dtype()
    return torch.arange(size, device=device, dtype=dtype) - size // 2


def frequency_grid_2d(
    size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Frequencies of a centred (D, D) spectrum: (D, D, 2), ``[..., 0] = kx``, in cycles/px."""
    k = _centred_coordinates_px(size, device, dtype) / size
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack((kx, ky), dim=-1)


def frequency_grid_3d(
    size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Frequencies of a centred (D, D, D) spectrum [z, y, x]: (D, D, D, 3) as (kx, ky, kz)."""
    k = _centred_coordinates_px(size, device, dtype) / size
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.stack((kx, ky, kz), dim=-1)


def radial_frequency_px(
    size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Radius ``|k| * D`` of each sample of a centred (D, D) grid, in lattice pixels: (D, D).

    The same numbers are the real-space distance from the box centre in pixels.
    """
    return frequency_grid_2d(size, device, dtype).norm(dim=-1) * size


def circular_mask(
    size: int, radius_px: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean (D, D) mask of the Fourier lattice, True where ``|k| * D <= radius_px``."""
    return radial_frequency_px(size, device, torch.float64) <= radius_px


def real_space_disk_mask(
    size: int, radius_px: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean (D, D) real-space disk, True within ``radius_px`` pixels of the centre ``D // 2``.

    The same lattice test as :func:`circular_mask`, named for real-space use.
    """
    return circular_mask(size, radius_px, device)


def soft_circular_window(
    size: int,
    inner_fraction: float,
    outer_fraction: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Real-space (D, D) window: 1 within ``inner_fraction * D / 2`` px of the centre, a raised
    cosine falling to 0 at ``outer_fraction * D / 2`` px, and 0 beyond."""
    if not 0 <= inner_fraction < outer_fraction:
        raise ValueError("need 0 <= inner_fraction < outer_fraction")
    radius_px = radial_frequency_px(size, device, dtype)
    inner_px = inner_fraction * size / 2
    outer_px = outer_fraction * size / 2
    ramp = ((radius_px - inner_px) / (outer_px - inner_px)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * ramp))


def pad_centered(array: torch.Tensor, new_size: int, ndim: int) -> torch.Tensor:
    """Zero-pad the last ``ndim`` axes (each of size D) to ``new_size``, keeping the centre
    index ``D // 2`` at ``new_size // 2``. (..., D, ..., D) -> (..., P, ..., P)."""
    size = array.shape[-1]
    before = new_size // 2 - size // 2
    after = new_size - size - before
    return torch.nn.functional.pad(array, (before, after) * ndim)


def crop_centered(array: torch.Tensor, new_size: int, ndim: int) -> torch.Tensor:
    """Central ``new_size`` block of the last ``ndim`` axes; the inverse of :func:`pad_centered`."""
    start = array.shape[-1] // 2 - new_size // 2
    window = slice(start, start + new_size)
    return array[(..., *([window] * ndim))]
