"""Rigid superposition of two real-space maps, in either hand.

Maps are centred (G, G, G) [z, y, x] tensors and points offsets (x, y, z) in voxels from the centre voxel ``G // 2``
(:mod:`cryofire.model.trilinear`). A fit (R, v) means ``moving(R p + v) ~ reference(p)``, R (3, 3) and v (3,) px.
Used to put the class maps of the classical ab initio in one frame (:mod:`cryofire.model.em_refine`) and ab initio
maps in the truth's frame (:mod:`cryofire.evaluate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cryofire.model.trilinear import sample_slices, voxel_offsets
from cryofire.physics import axis_angle_to_matrix, random_rotations


@dataclass(frozen=True)
class RigidFit:
    """``moving(R p + v) ~ reference(p)``, or with ``mirrored`` ``moving(-(R p + v)) ~ reference(p)``: the fit is
    of the moving map's point reflection (the other hand). ``correlation``: :func:`dense_correlation` of the fit."""

    rotation: torch.Tensor
    translation: torch.Tensor
    mirrored: bool
    correlation: float


def point_reflection(grids: torch.Tensor) -> torch.Tensor:
    """``V(-p)`` of centred grids (..., G, G, G), exact on the lattice (flip, then a one-voxel roll if G is even)."""
    shift = 1 - grids.shape[-1] % 2
    return torch.roll(torch.flip(grids, dims=(-3, -2, -1)), shifts=(shift,) * 3, dims=(-3, -2, -1))


def _points_within(size: int, radius_px: float | None, device: torch.device) -> torch.Tensor:
    radius = 0.85 * size / 4 if radius_px is None else radius_px
    points = voxel_offsets(size, device)
    return points[points.norm(dim=-1) <= radius]


def _correlation(target: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted Pearson correlation of ``target`` (n,) with each row of ``values`` (C, n): (C,)."""
    a = target - (weight * target).sum() / weight.sum()
    b = values - (weight * values).sum(-1, keepdim=True) / weight.sum()
    return (weight * a * b).sum(-1) / ((weight * a * a).sum() * (weight * b * b).sum(-1)).sqrt().clamp_min(1e-30)


def _dense(values: torch.Tensor) -> torch.Tensor:
    return values.abs() > 0.1 * values.abs().max()


@torch.no_grad()
def fit_rigid_part(reference: torch.Tensor, moving: torch.Tensor, generator: torch.Generator,
                   keep_fraction: float = 0.5, radius_px: float | None = None, angle_deg: float = 25.0,
                   step_px: float = 2.0, passes: int = 8, rounds: int = 8, candidates: int = 96,
                   start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid superposition of two conformations by their largest common part, near ``start`` (R, v) (identity).

    Finds R (3, 3) and v (3,) px with ``moving(R p + v) ~ reference(p)`` over the voxels within ``radius_px``
    (0.85 G / 4: the map inside a 2x padded box). The first pass maximises the correlation over all of them; each
    later pass only over the voxels with density (above a tenth of the maximum in either map) whose difference
    after the previous fit is in the best ``keep_fraction``: the domain that moved between the conformations drops
    out, so the fit converges on the rigid part (a fit of whole maps settles on a compromise tens of degrees away,
    bench/RESULTS.md). Each pass is ``rounds`` of ``candidates`` random perturbations of the best (within
    ``angle_deg`` and ``step_px`` in the first pass, a quarter of those later; halving each round), then an L-BFGS
    polish. A local search: :func:`superpose` starts it from a global search.
    """
    points = _points_within(reference.shape[-1], radius_px, reference.device)
    target = sample_slices(reference[None], points[None])[0, :, 0]
    channels = moving[None]

    def moved(rotations: torch.Tensor, translations: torch.Tensor) -> torch.Tensor:  # (C, n)
        return sample_slices(channels, points @ rotations.transpose(-1, -2) + translations[:, None])[..., 0]

    rotation, translation = start if start is not None else (torch.eye(3, device=reference.device),
                                                             torch.zeros(3, device=reference.device))
    weight = torch.ones_like(target)
    for index in range(passes):
        narrowing = 1.0 if index == 0 else 0.25  # later passes polish near the previous fit
        angle, step = math.radians(angle_deg) * narrowing, step_px * narrowing
        for _ in range(rounds):
            turns = torch.randn(candidates, 3, generator=generator).to(target.device) * (angle / math.sqrt(3))
            steps = torch.randn(candidates, 3, generator=generator).to(target.device) * (step / math.sqrt(3))
            turns[0], steps[0] = 0.0, 0.0
            trial_r, trial_t = axis_angle_to_matrix(turns) @ rotation, translation + steps
            best = _correlation(target, moved(trial_r, trial_t), weight).argmax()
            rotation, translation, angle, step = trial_r[best], trial_t[best], angle / 2, step / 2
        rotation, translation = _polish(lambda r, t: -_correlation(target, moved(r[None], t[None]), weight)[0],
                                        rotation, translation)
        fitted = moved(rotation[None], translation[None])[0]
        difference = (target - fitted * (fitted @ target) / fitted.square().sum().clamp_min(1e-30)).abs()
        dense = _dense(target) | _dense(fitted)
        weight = (dense & (difference <= difference[dense].quantile(keep_fraction))).float()
    return rotation, translation


@torch.no_grad()
def dense_correlation(reference: torch.Tensor, moving: torch.Tensor, rotation: torch.Tensor,
                      translation: torch.Tensor, radius_px: float | None = None) -> float:
    """Correlation of ``reference(p)`` and ``moving(R p + v)`` over the voxels within ``radius_px`` with density
    (above a tenth of the maximum) in either: the score that compares fits from different starts and hands."""
    points = _points_within(reference.shape[-1], radius_px, reference.device)
    target = sample_slices(reference[None], points[None])[0, :, 0]
    fitted = sample_slices(moving[None], (points @ rotation.T + translation)[None])[0, :, 0]
    return float(_correlation(target, fitted[None], (_dense(target) | _dense(fitted)).float())[0])


def _centre_of_mass(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    mass = sample_slices(volume[None], points[None])[0, :, 0].clamp_min(0.0)
    return (mass[:, None] * points).sum(0) / mass.sum().clamp_min(1e-30)


@torch.no_grad()
def orientation_search(reference: torch.Tensor, moving: torch.Tensor, generator: torch.Generator,
                       n_rotations: int = 4096, keep: int = 2, radius_px: float | None = None, chunk: int = 256
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``keep`` best of ``n_rotations`` random rotations R (and the identity), each with the translation v that
    puts the centres of mass (of the positive density) on each other, by the correlation of ``reference(p)`` with
    ``moving(R p + v)`` over every other voxel within ``radius_px``: starts for :func:`fit_rigid_part`."""
    device = reference.device
    points = _points_within(reference.shape[-1], radius_px, device)
    coarse = points[(points.round().long() % 2 == 0).all(-1)]
    target = sample_slices(reference[None], coarse[None])[0, :, 0]
    rotations = torch.cat((torch.eye(3, device=device)[None],
                           random_rotations(n_rotations, generator=generator).to(device)))
    translations = _centre_of_mass(moving, points) - rotations @ _centre_of_mass(reference, points)
    scores = torch.cat([_correlation(target, sample_slices(moving[None], coarse @ r.transpose(-1, -2) + t[:, None])[
        ..., 0], torch.ones_like(target)) for r, t in zip(rotations.split(chunk), translations.split(chunk))])
    best = scores.topk(keep).indices
    return [(rotations[i], translations[i]) for i in best]


def superpose(reference: torch.Tensor, moving: torch.Tensor, generator: torch.Generator, keep_fraction: float = 0.5,
              n_rotations: int = 8192, starts: int = 1) -> RigidFit:
    """The best rigid fit of ``moving`` or of its point reflection (the other hand) onto ``reference``.

    In each hand :func:`fit_rigid_part` runs from the ``starts`` best orientations of a global search
    (:func:`orientation_search`), and in the direct hand also from the identity; the fit with the highest
    :func:`dense_correlation` wins. Two class maps of one ab initio can come out in opposite hands (a projection
    cannot tell them apart) and tens of degrees apart, out of reach of a local fit from the identity.
    """
    best = None
    for mirrored in (False, True):
        candidate = point_reflection(moving) if mirrored else moving
        begins = orientation_search(reference, candidate, generator, n_rotations, starts)
        if not mirrored:
            begins.append((torch.eye(3, device=reference.device), torch.zeros(3, device=reference.device)))
        for begin in begins:
            rotation, translation = fit_rigid_part(reference, candidate, generator, keep_fraction, start=begin)
            score = dense_correlation(reference, candidate, rotation, translation)
            if best is None or score > best.correlation:
                best = RigidFit(rotation, translation, mirrored, score)
    return best


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
