"""Trilinear sampling of centred 3D grids: slices and their exact adjoint, and the rigid superposition of two maps.

Grids are centred (C, G, G, G) [z, y, x] tensors; points are offsets (x, y, z) in voxels from the centre voxel
``G // 2``. Used by the classical ab initio (:mod:`cryofire.model.em_init`) and to put ab initio maps in the truth's
frame (:mod:`cryofire.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cryofire.physics import axis_angle_to_matrix


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


@torch.no_grad()
def fit_rigid_part(reference: torch.Tensor, moving: torch.Tensor, generator: torch.Generator,
                   keep_fraction: float = 0.5, radius_px: float | None = None, angle_deg: float = 25.0,
                   step_px: float = 2.0, passes: int = 8, rounds: int = 8, candidates: int = 96
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid superposition of two conformations by their largest common part.

    Finds the rotation R (3, 3) and translation v (3,) px with ``moving(R p + v) ~ reference(p)``, p the voxel
    offsets (x, y, z) from the centre of the two centred real-space maps (G, G, G) within ``radius_px``. The first
    pass maximises the correlation over all of them; each later pass only over the voxels with density (above a
    tenth of the maximum in either map) whose difference after the previous fit is in the best ``keep_fraction``:
    the domain that moved between the conformations drops out, so the fit converges on the rigid part (a fit of
    whole maps settles on a compromise tens of degrees away, bench/RESULTS.md). Each pass is ``rounds`` of
    ``candidates`` random perturbations of the best (within ``angle_deg`` and ``step_px`` in the first pass, a
    quarter of those later; halving each round), then an L-BFGS polish.
    """
    size = reference.shape[-1]
    radius = 0.85 * size / 4 if radius_px is None else radius_px
    points = voxel_offsets(size, reference.device)
    points = points[points.norm(dim=-1) <= radius]
    target = sample_slices(reference[None], points[None])[0, :, 0]
    channels = moving[None]

    def moved(rotations: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:  # (C, n)
        return sample_slices(channels, points @ rotations.transpose(-1, -2) + translations[:, None])[..., 0]

    def correlation(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        a = target - (weight * target).sum() / weight.sum()
        b = values - (weight * values).sum(-1, keepdim=True) / weight.sum()
        return (weight * a * b).sum(-1) / ((weight * a * a).sum() * (weight * b * b).sum(-1)).sqrt().clamp_min(1e-30)

    rotation, translation = torch.eye(3, device=reference.device), torch.zeros(3, device=reference.device)
    weight = torch.ones_like(target)
    for index in range(passes):
        narrowing = 1.0 if index == 0 else 0.25  # later passes polish near the previous fit
        angle, step = math.radians(angle_deg) * narrowing, step_px * narrowing
        for _ in range(rounds):
            turns = torch.randn(candidates, 3, generator=generator).to(target.device) * (angle / math.sqrt(3))
            steps = torch.randn(candidates, 3, generator=generator).to(target.device) * (step / math.sqrt(3))
            turns[0], steps[0] = 0.0, 0.0
            trial_r, trial_t = axis_angle_to_matrix(turns) @ rotation, translation + steps
            best = correlation(moved(trial_r, trial_t), weight).argmax()
            rotation, translation, angle, step = trial_r[best], trial_t[best], angle / 2, step / 2
        rotation, translation = _polish(lambda r, t: -correlation(moved(r[None], t[None]), weight)[0],
                                        rotation, translation)
        fitted = moved(rotation[None], translation[None])[0]
        difference = (target - fitted * (fitted @ target) / fitted.square().sum().clamp_min(1e-30)).abs()
        dense = (target.abs() > 0.1 * target.abs().max()) | (fitted.abs() > 0.1 * fitted.abs().max())
        weight = (dense & (difference <= difference[dense].quantile(keep_fraction))).float()
    return rotation, translation


def _polish(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rotation: torch.Tensor,
            translation: torch.Tensor, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on a small turn ``exp([w]x) R`` and move ``t + d`` minimising ``loss(rotation, translation)``."""
    turn = torch.zeros(3, device=rotation.device, requires_grad=True)
    move = torch.zeros(3, device=rotation.device, requires_grad=True)
    optimiser = torch.optim.LBFGS([turn, move], max_iter=iterations, line_search_fn="strong_wolfe")

    def turned(w: torch.Tensor) -> torch.Tensor:
        zero = w.new_zeros(())
        skew = torch.stack((torch.stack((zero, -w[2], w[1])), torch.stack((w[2], zero, -w[0])),
                            torch.stack((-w[1], w[0], zero))))
        return torch.linalg.matrix_exp(skew) @ rotation

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss(turned(turn), translation + move)
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(closure)
    return turned(turn).detach(), (translation + move).detach()
