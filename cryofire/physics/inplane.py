"""In-plane rotation of images about the box centre ``D // 2``, and the pose it stands for.

Turning an image's content by ``angle_deg`` counter-clockwise in the (x = columns, y = rows) plane gives the image
of the pose ``inplane_rotation_matrix(angle_deg) @ A`` (docs/conventions.md: a volume point ``p`` appears at
``(A p)[:2]``; in RELION's angles, psi decreases by the angle), and turns the image's re-centring shift by the same
2D rotation.
"""

from __future__ import annotations

import torch

from cryofire.physics.lattice import frequency_grid_2d
from cryofire.physics.rotations import euler_to_matrix


def inplane_rotation_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotations (..., 3, 3) about the viewing axis z by ``angles_deg`` (...,), counter-clockwise from x to y: the
    RELION matrix of psi = -angle (rot = tilt = 0)."""
    zero = torch.zeros_like(angles_deg)
    return euler_to_matrix(zero, zero, -angles_deg)


def rotate_images(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Images (B, D, D) with their content turned by ``angles_deg`` (B,) about ``D // 2``: bilinear, zero outside.

    The content at offset ``q`` (x, y) px from the centre moves to ``R(angle) q``; multiples of 90 degrees are exact
    permutations of the pixels (less the row or column an even box has no partner for).
    """
    size = images.shape[-1]
    offsets_px = frequency_grid_2d(size, device=images.device, dtype=images.dtype) * size  # (D, D, 2): x, y
    back = inplane_rotation_matrix(-angles_deg.to(images.dtype))[:, :2, :2]  # each output pixel reads R(-a) u
    source_px = torch.einsum("bij,yxj->byxi", back, offsets_px) + size // 2
    grid = source_px * (2 / (size - 1)) - 1  # grid_sample's (x, y) in [-1, 1], corners aligned to pixel centres
    sampled = torch.nn.functional.grid_sample(images[:, None], grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)
    return sampled[:, 0]
