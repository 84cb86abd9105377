"""Trilinear sampling of centred 3D grids: slices and their exact adjoint.

Grids are centred (C, G, G, G) [z, y, x] tensors; points are offsets (x, y, z) in voxels from the centre voxel
``G // 2``. Used by the classical ab initio (:mod:`cryofire.model.em_init`) and the superposition of maps
(:mod:`cryofire.model.superpose`).
"""

from __future__ import annotations

import torch


def sample_slices(channels: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a centred (C, G, G, G) grid at lattice offsets (J, n, 3) (x, y, z): (J, n, C)."""
    size = channels.shape[-1]
    grid = ((points_px + size // 2) * (2.0 / (size - 1)) - 1.0)[None, :, :, None, :]
    sampled = torch.nn.functional.grid_sample(channels[None], grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)
    return sampled[0, :, :, :, 0].permute(1, 2, 0)


def insert_slices(values: torch.Tensor, points_px: torch.Tensor, size: int) -> torch.Tensor:
    """Adjoint of :func:`sample_slices`: values (J, n, C) spread onto a (C, G, G, G) grid of side ``size``."""
    grid = torch.zeros(values.shape[-1], size, size, size, device=values.device, requires_grad=True)
    with torch.enable_grad():
        sampled = sample_slices(grid, points_px)
        (inserted,) = torch.autograd.grad(sampled, grid, values)
    return inserted


def voxel_offsets(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Offsets (x, y, z) px of each voxel of a centred (size, size, size) [z, y, x] grid from its centre, (size^3, 3).
    """
    offsets = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    return torch.stack(torch.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).flip(-1).reshape(-1, 3)
