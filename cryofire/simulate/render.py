"""Exact rendering of pseudo-atomic models: projections and volumes as sums of Gaussians.

A Gaussian's projection along any direction is a Gaussian of the same width, so projections of the phantom are
computed exactly in real space (no interpolation), and each image costs one small matrix product thanks to
separability: ``image[y, x] = sum_a w_a g(y - y_a) g(x - x_a)``.
"""

from __future__ import annotations

import math

import torch


def atom_sigma_px(pixel_size_angstrom: float, atom_sigma_angstrom: float | None = None) -> float:
    """Gaussian width of a pseudo-atom in pixels: `atom_sigma_angstrom`, or by default max(2 Å, 1 px)."""
    sigma_angstrom = atom_sigma_angstrom if atom_sigma_angstrom is not None else max(2.0, pixel_size_angstrom)
    return sigma_angstrom / pixel_size_angstrom


# Beyond 6 sigma a Gaussian is below 1.5e-8 of its peak (under float32 resolution): profiles are computed within it.
_TRUNCATION_SIGMAS = 6.0


def _profiles(positions_px: torch.Tensor, size: int, sigma_px: float) -> torch.Tensor:
    """exp(-(u - u_a)^2 / (2 sigma^2)) on the pixel grid: positions (..., N) -> (..., size, N).

    Each atom's profile is computed on the pixels within `_TRUNCATION_SIGMAS` sigma of it and is zero elsewhere,
    which costs (2 * ceil(6 sigma) + 1) instead of `size` exponentials per atom.
    """
    half = math.ceil(_TRUNCATION_SIGMAS * sigma_px)
    grid_offset = size // 2
    if 2 * half + 1 >= size:
        grid = torch.arange(size, dtype=positions_px.dtype, device=positions_px.device) - grid_offset
        return torch.exp(-((grid[:, None] - positions_px[..., None, :]) ** 2) / (2.0 * sigma_px**2))
    # Window of pixels (grid index) nearest + o, o in [-half, half]; the nearest pixel is clamped into the box so
    # that the window stays within [-half, size - 1 + half] (values still use the true distance to the atom).
    nearest = (torch.round(positions_px) + grid_offset).clamp(0, size - 1)
    offsets = torch.arange(-half, half + 1, dtype=positions_px.dtype, device=positions_px.device)
    window = nearest[..., None, :] + offsets[:, None]  # (..., W, N) grid indices
    distance = window - grid_offset - positions_px[..., None, :]
    values = distance.square_().mul_(-0.5 / sigma_px**2).exp_()
    padded_shape = (*positions_px.shape[:-1], size + 2 * half, positions_px.shape[-1])
    padded = torch.zeros(padded_shape, dtype=positions_px.dtype, device=positions_px.device)
    padded.scatter_(-2, (window + half).long(), values)
    return padded[..., half : half + size, :]


def render_projections(
    atoms_angstrom: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    size: int,
    pixel_size_angstrom: float,
    sigma_px: float,
    shift_px: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projections of Gaussian pseudo-atoms, (B, D, D).

    Args:
        atoms_angstrom: (B, N, 3) or (N, 3) atom centres (x, y, z) in Å from the box centre.
        weights: (N,) atom weights.
        rotations: (B, 3, 3) RELION pose matrices A; an atom at p appears at (A p)[:2].
        size: box size D in pixels.
        pixel_size_angstrom: pixel size, Å.
        sigma_px: atom width, pixels.
        shift_px: (B, 2) displacement (x, y) of the image content, pixels (RELION: minus the origin).

    Values are line integrals of the volume :func:`render_volume` would give (density x pixels).
    """
    atoms = atoms_angstrom.expand(len(rotations), -1, -1) if atoms_angstrom.dim() == 2 else atoms_angstrom
    rotated = torch.einsum("bij,bnj->bni", rotations, atoms) / pixel_size_angstrom
    if shift_px is not None:
        rotated = rotated + torch.nn.functional.pad(shift_px, (0, 1))[:, None, :]
    profile_x = _profiles(rotated[..., 0], size, sigma_px)  # (B, D, N)
    profile_y = _profiles(rotated[..., 1], size, sigma_px) * weights  # (B, D, N)
    images = profile_y @ profile_x.transpose(1, 2)  # (B, D_y, D_x)
    return images * (math.sqrt(2.0 * math.pi) * sigma_px)


def render_volume(
    atoms_angstrom: torch.Tensor, weights: torch.Tensor, size: int, pixel_size_angstrom: float, sigma_px: float
) -> torch.Tensor:
    """Voxel volume of Gaussian pseudo-atoms (peak value = weight), (D, D, D) indexed [z, y, x]."""
    atoms_px = atoms_angstrom / pixel_size_angstrom
    profile_x = _profiles(atoms_px[:, 0], size, sigma_px)
    profile_y = _profiles(atoms_px[:, 1], size, sigma_px)
    profile_z = _profiles(atoms_px[:, 2], size, sigma_px) * weights
    return torch.einsum("za,ya,xa->zyx", profile_z, profile_y, profile_x)
