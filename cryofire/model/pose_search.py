"""A global pose search against the current hypervolume, used as a teacher for the amortized encoder.

Why: an amortized encoder trained only through the image loss must find every image's pose by gradient descent from
a random start, and in the budget of a few hundred thousand images it often settles in a local minimum (the
official cryoFIRE code did not converge here in 170k images; see docs/method.md). So, when asked
(``--search-fraction`` > 0; experimental, off by default), during the first part of training the trainer
periodically scores every training image against projections of the current consensus map (z = 0) at a few
thousand random rotations and a grid of shifts, at the current (low) frequency radius, and the best pose becomes (a) the pose the decoder is trained with and (b) the
target the encoder learns to predict. After that phase the encoder is on its own: poses come from it alone, as in
cryoFIRE, and `cryofire infer` needs no search.

The score of image i at rotation j and shift t is the squared error
``sum_k |c_ik P_jk - Y_ik(t)|^2 = sum_k c_ik^2 |P_jk|^2 - 2 Re sum_k c_ik conj(P_jk) Y_ik(t) + const``
over the fitted half-plane frequencies k, with CTF c, slice P and observed spectrum Y moved by t: two matrix
products per shift, so thousands of rotations for thousands of images cost seconds.
"""

from __future__ import annotations

import math

import torch

from cryofire.model.decoder import HyperVolume
from cryofire.model.image_formation import HalfPlaneLattice, recentre
from cryofire.physics import frequency_grid_3d, random_rotations, slice_volume_ft


def shift_grid(max_shift_px: float, step_px: float = 1.0) -> torch.Tensor:
    """Shifts (T, 2) in pixels on a square grid of `step_px`, within a disk of radius `max_shift_px`."""
    steps = int(math.floor(max_shift_px / step_px))
    axis = torch.arange(-steps, steps + 1, dtype=torch.float32) * step_px
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), dim=-1).reshape(-1, 2)
    return grid[grid.norm(dim=-1) <= max_shift_px + 1e-6]


@torch.no_grad()
def consensus_volume_ft(decoder: HyperVolume, zdim: int, radius_px: float) -> torch.Tensor:
    """The decoder's map at z = 0 on the centred (D, D, D) Fourier grid (values / D), zero beyond `radius_px`."""
    size = decoder.box_size
    device = decoder.feature_positions_px.device
    coords = frequency_grid_3d(size, device=device).reshape(-1, 3)
    inside = (coords.norm(dim=-1) * size <= radius_px + 1.0).nonzero().squeeze(-1)
    values = decoder(coords[inside][None], torch.zeros(1, zdim, device=device))[0].float()
    grid = torch.zeros(size**3, dtype=torch.complex64, device=device)
    grid[inside] = torch.complex(values[:, 0], values[:, 1])
    return grid.reshape(size, size, size)


@torch.no_grad()
def projection_table(volume_ft: torch.Tensor, rotations: torch.Tensor, lattice: HalfPlaneLattice, count: int,
                     chunk: int = 1024) -> torch.Tensor:
    """Central slices at the first `count` half-plane points for each rotation: (J, count, 2) (Re, Im)."""
    slices = []
    for part in rotations.split(chunk):
        spectrum = lattice.gather(slice_volume_ft(volume_ft, part), count)
        slices.append(torch.stack((spectrum.real, spectrum.imag), dim=-1))
    return torch.cat(slices)


@torch.no_grad()
def best_poses(
    observed: torch.Tensor, ctf: torch.Tensor, coords: torch.Tensor, projections: torch.Tensor,
    shifts_px: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best (rotation index (B,), shift (B, 2) px, squared error up to a constant (B,)) for a batch.

    Args:
        observed: (B, n, 2) observed spectra at the fitted points.
        ctf: (B, n) CTF values there.
        coords: (n, 2) the fitted frequencies (cycles/px).
        projections: (J, n, 2) slices of the map (:func:`projection_table`).
        shifts_px: (T, 2) candidate re-centring shifts (RELION origin sign).
    """
    power = ctf.square() @ projections.square().sum(-1).T  # (B, J)
    flat_projections = projections.reshape(len(projections), -1)  # (J, 2n)
    best_score = torch.full((len(observed),), math.inf, device=observed.device)
    best_rotation = torch.zeros(len(observed), dtype=torch.long, device=observed.device)
    best_shift = torch.zeros(len(observed), 2, device=observed.device)
    for shift in shifts_px:
        moved = recentre(observed, coords, shift.expand(len(observed), 1, 2))[:, 0]  # (B, n, 2)
        cross = (moved * ctf[..., None]).reshape(len(observed), -1) @ flat_projections.T  # (B, J)
        score, index = (power - 2.0 * cross).min(dim=1)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_rotation = torch.where(better, index, best_rotation)
        best_shift[better] = shift
    return best_rotation, best_shift, best_score


def search_rotations(count: int, seed: int, device: torch.device) -> torch.Tensor:
    """`count` uniformly random rotations (J, 3, 3), a new set for every `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return random_rotations(count, generator=generator).float().to(device)
