"""Refinement stage of the classical ab initio (:mod:`cryofire.model.em_init`): class maps rebuilt from hard
assignments, local and global pose searches, and the superposition of the class maps in one frame.

Spectra, CTFs, rotations and shifts as in :mod:`cryofire.model.em_init`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cryofire.model.image_formation import recentre
from cryofire.model.trilinear import fit_rigid_part, insert_slices
from cryofire.physics import ifft3_centered

if TYPE_CHECKING:
    from cryofire.model.em_init import StochasticEM


def friedel_symmetrise(grid: torch.Tensor) -> torch.Tensor:
    """``g(k) + conj(g(-k))`` for centred (C, G, G, G) grids with channels (Re, Im, weight): Im is odd."""
    mirrored = torch.roll(torch.flip(grid, dims=(-3, -2, -1)), shifts=(1, 1, 1), dims=(-3, -2, -1))
    sign = torch.ones(grid.shape[0], 1, 1, 1, device=grid.device)
    sign[1] = -1.0
    return grid + sign * mirrored


@torch.no_grad()
def reconstruct(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                shifts: torch.Tensor, classes: torch.Tensor, radius_px: float, chunk: int = 500) -> None:
    """Rebuild ``em``'s class maps within ``radius_px`` from hard assignments: rotations (N, 3, 3), shifts (N, 2)
    px and classes (N,) of the images with spectra (N, M, 2) and CTF (N, M)."""
    count = em.lattice.count_within(radius_px)
    coords = em.lattice.coords[:count]
    em.sums.zero_()
    for part in torch.arange(len(observed), device=em.device).split(chunk):
        spectra, weights = observed[part, :count].to(em.device), ctf[part, :count].to(em.device)
        moved = recentre(spectra, coords, shifts[part][:, None])[:, 0] * weights[..., None]
        values = torch.cat((moved, weights.square()[..., None]), -1)
        points = em._points(rotations[part], count)
        for k in range(em.config.classes):
            mine = classes[part] == k
            em.sums[k] += friedel_symmetrise(insert_slices(values[mine], points[mine], em.grid_size))
    em.update_maps(count)


def worst_fits(scores: torch.Tensor, observed: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` of the images whose best pose explains the smallest part of their power: the
    lowest ``-score / |Y|^2`` (scores (B,) of :func:`fit_scores` at spectra ``observed`` (B, n, 2)). An image in a
    wrong basin explains less of itself than its neighbours at the same noise level."""
    explained = -scores / observed.square().sum((-2, -1)).clamp_min(1e-12)
    return explained.argsort()[: math.ceil(fraction * len(scores))]


@torch.no_grad()
def refine(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
           shifts: torch.Tensor, classes: torch.Tensor, radius_px: float, start_angle_deg: float = 8.0,
           rounds: int = 3, candidates: int = 48, global_rotations: int = 8192, global_radius_px: float = 7.0,
           chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of refinement at ``radius_px``: rebuild each class map from the hard assignments (rotations
    (N, 3, 3), shifts (N, 2) px, classes (N,)), then move every image to its best pose near the current one in
    every class map; the ``research_fraction`` (EMConfig) that fit worst there (:func:`worst_fits`) move to the
    result of a fresh global search if it fits better (:meth:`StochasticEM.assign`: ``global_rotations`` random
    rotations at up to ``global_radius_px``, then local searches at the full radius from the best few; 0 rotations
    for none): it rescues images the earlier stages put in a wrong basin. Returns new rotations, shifts and classes."""
    reconstruct(em, observed, ctf, rotations, shifts, classes, radius_px, chunk)
    count = em.lattice.count_within(radius_px)
    best_score = torch.full((len(observed),), math.inf, device=em.device)
    new_r, new_t, new_c = rotations.clone(), shifts.clone(), classes.clone()
    for part in torch.arange(len(observed), device=em.device).split(chunk):
        spectra, weights = observed[part, :count].to(em.device), ctf[part, :count].to(em.device)
        for k in range(em.config.classes):
            r, t, score = em.local_search(k, spectra, weights, rotations[part], shifts[part], start_angle_deg,
                                          em.config.shift_step_px / 2, rounds, candidates)
            better = score < best_score[part]
            best_score[part] = torch.where(better, score, best_score[part])
            index = part[better]
            new_r[index], new_t[index], new_c[index] = r[better], t[better], k
        if global_rotations and em.config.research_fraction > 0:
            worst = worst_fits(best_score[part], spectra, em.config.research_fraction)
            r, t, c, score = em.assign(spectra[worst], weights[worst], radius_px, global_rotations, rounds,
                                       candidates, global_radius_px=global_radius_px)
            better = score < best_score[part[worst]]
            index = part[worst][better]
            best_score[index] = score[better]
            new_r[index], new_t[index], new_c[index] = r[better], t[better], c[better]
    return new_r, new_t, new_c


def real_space_maps(em: StochasticEM) -> torch.Tensor:
    """The class maps in real space on the padded grid, (K, G, G, G), voxels of the image's pixel size."""
    return ifft3_centered(em.volume_ft).real


def class_frames(em: StochasticEM, keep_fraction: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each class map's rigid superposition (R, v) onto class 0's map by their common part
    (:func:`fit_rigid_part`); class 0 gets the identity. After the split the class maps drift apart (rotation
    and translation: both leave the likelihood unchanged), and one global frame is what users compare
    conformations in."""
    maps = real_space_maps(em)
    identity = (torch.eye(3, device=em.device), torch.zeros(3, device=em.device))
    return [identity] + [fit_rigid_part(maps[0], maps[k], em.generator, keep_fraction)
                         for k in range(1, em.config.classes)]


def in_first_class_frame(rotations: torch.Tensor, shifts: torch.Tensor, classes: torch.Tensor,
                         frames: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses of the images of class k re-expressed in class 0's frame (:func:`class_frames`): if
    ``V_k(R p + v) = V_0(p)``, the image at pose A and re-centring shift t (px) in map k is the image at pose
    ``A R`` and shift ``t - (A v)_xy`` in map 0. Returns rotations (N, 3, 3) and shifts (N, 2)."""
    new_r, new_t = rotations.clone(), shifts.clone()
    for k, (rotation, translation) in enumerate(frames):
        mine = classes == k
        new_r[mine] = rotations[mine] @ rotation
        new_t[mine] = shifts[mine] - (rotations[mine] @ translation)[:, :2]
    return new_r, new_t
