"""Refinement stage of the classical ab initio (:mod:`cryofire.model.em_init`): class maps rebuilt from hard
assignments, local and global pose searches, and the superposition of the class maps in one frame.

Spectra, CTFs, rotations and shifts as in :mod:`cryofire.model.em_init`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from cryofire.model.image_formation import recentre
from cryofire.model.superpose import RigidFit, point_reflection, superpose
from cryofire.model.trilinear import insert_slices
from cryofire.physics import ifft3_centered

if TYPE_CHECKING:
    from cryofire.model.em_init import StochasticEM


def friedel_symmetrise(grid: torch.Tensor) -> torch.Tensor:
    """``g(k) + conj(g(-k))`` for centred (C, G, G, G) grids with channels (Re, Im, weight): Im is odd."""
    mirrored = point_reflection(grid)
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


@torch.no_grad()
def residual_power(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                   shifts: torch.Tensor, classes: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Mean power (D // 2 + 1,) per radius shell of the residuals ``Y exp(-2 pi i k.t) - C X_c(A^T k)`` of spectra
    (N, M, 2) with CTF (N, M) at their rotations (N, 3, 3), shifts (N, 2) px and classes (N,) in ``em``'s maps: the
    noise spectrum the fits leave (plus the maps' own errors), per spectrum coefficient."""
    count = observed.shape[1]
    coords = em.lattice.coords[:count]
    total = torch.zeros(count, device=em.device)
    for part in torch.arange(len(observed), device=em.device).split(chunk):
        moved = recentre(observed[part].to(em.device), coords, shifts[part][:, None])[:, 0]
        points = em._points(rotations[part], count)
        slices = torch.zeros_like(moved)
        for k in range(em.config.classes):
            mine = classes[part] == k
            slices[mine] = em._class_slices(points[mine], [k])
        total += (moved - ctf[part].to(em.device)[..., None] * slices).square().sum(-1).sum(0)
    return em.per_shell_mean(total / len(observed), count)


def explained_fraction(scores: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Fraction of each image's power that its fit explains, ``-score / |Y|^2``: (B,), for scores (B,) of
    :func:`fit_scores` at spectra ``observed`` (B, n, 2) (the points that were scored)."""
    return -scores / observed.square().sum((-2, -1)).clamp_min(1e-12)


def worst_fits(scores: torch.Tensor, observed: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``fraction`` of the images whose best pose explains the smallest part of their power
    (:func:`explained_fraction`). An image in a wrong basin explains less of itself than its neighbours at the same
    noise level."""
    return explained_fraction(scores, observed).argsort()[: math.ceil(fraction * len(scores))]


def local_in_every_class(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                         shifts: torch.Tensor, count: int, start_angle_deg: float = 8.0, rounds: int = 3,
                         candidates: int = 48) -> tuple[torch.Tensor, ...]:
    """Each image's best pose near its current one (rotations (B, 3, 3), shifts (B, 2) px) in every class map of
    ``em``, at the first ``count`` points of the spectra (B, M, 2) and CTF (B, M) (:meth:`StochasticEM.local_search`):
    rotations (B, K, 3, 3), shifts (B, K, 2) and scores (B, K)."""
    spectra, weights = observed[:, :count].to(em.device), ctf[:, :count].to(em.device)
    found = [em.local_search(k, spectra, weights, rotations, shifts, start_angle_deg, em.config.shift_step_px / 2,
                             rounds, candidates) for k in range(em.config.classes)]
    return tuple(torch.stack(values, 1) for values in zip(*found))


@torch.no_grad()
def refine(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
           shifts: torch.Tensor, classes: torch.Tensor, radius_px: float, research_fraction: float,
           start_angle_deg: float = 8.0, rounds: int = 3, candidates: int = 48, global_rotations: int = 8192,
           global_radius_px: float = 7.0, chunk: int = 500) -> tuple[torch.Tensor, ...]:
    """One round of refinement at ``radius_px``: rebuild each class map from the hard assignments (rotations
    (N, 3, 3), shifts (N, 2) px, classes (N,)), then move every image to its best pose near the current one in
    every class map; the ``research_fraction`` of them that fit worst there (:func:`worst_fits`) move to the
    result of a fresh global search in each class (:meth:`StochasticEM.assign_each_class`: ``global_rotations``
    random rotations at up to ``global_radius_px``, then local searches at the full radius from the best few; 0
    rotations for none) if it fits better: it rescues images the earlier stages put in a wrong basin.

    Returns new rotations, shifts and classes, and the best score (:func:`fit_scores`) found for each image in each
    class, (N, K).
    """
    reconstruct(em, observed, ctf, rotations, shifts, classes, radius_px, chunk)
    count = em.lattice.count_within(radius_px)
    class_scores = torch.empty(len(observed), em.config.classes, device=em.device)
    per_class_r = torch.empty(len(observed), em.config.classes, 3, 3, device=em.device)
    per_class_t = torch.empty(len(observed), em.config.classes, 2, device=em.device)
    for part in torch.arange(len(observed), device=em.device).split(chunk):
        spectra = observed[part, :count].to(em.device)
        per_class_r[part], per_class_t[part], class_scores[part] = local_in_every_class(
            em, observed[part], ctf[part], rotations[part], shifts[part], count, start_angle_deg, rounds, candidates)
        if global_rotations and research_fraction > 0:
            worst = part[worst_fits(class_scores[part].min(1).values, spectra, research_fraction)]
            r, t, score = em.assign_each_class(observed[worst], ctf[worst], radius_px, global_rotations, rounds,
                                               candidates, global_radius_px=global_radius_px)
            better = score < class_scores[worst]
            per_class_r[worst] = torch.where(better[..., None, None], r, per_class_r[worst])
            per_class_t[worst] = torch.where(better[..., None], t, per_class_t[worst])
            class_scores[worst] = torch.minimum(score, class_scores[worst])
    new_c = class_scores.argmin(1)
    index = torch.arange(len(observed), device=em.device)
    return per_class_r[index, new_c], per_class_t[index, new_c], new_c, class_scores


def class_margins(class_scores: torch.Tensor, observed: torch.Tensor, count: int) -> torch.Tensor:
    """How much better each image's best pose in its best class fits than its best pose in any other class, as a
    difference of :func:`explained_fraction` within the first ``count`` points: (N,) from scores (N, K) of
    :func:`refine` and spectra (N, M, 2). Images of one state held in the other state's class at a wrong pose sit at
    ~0 (median 0.14 for the rest on a simulated set)."""
    best, second = class_scores.topk(2, dim=1, largest=False).values.unbind(1)
    spectra = observed[:, :count].to(class_scores.device)
    return explained_fraction(best, spectra) - explained_fraction(second, spectra)


@torch.no_grad()
def reassign_ambiguous(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                       shifts: torch.Tensor, classes: torch.Tensor, margins: torch.Tensor, fraction: float,
                       radius_px: float, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search the ``fraction`` of the images with the smallest class ``margins`` (N,) (:func:`class_margins`)
    globally again in class maps rebuilt without them: images of one state held at a wrong pose in the other
    state's class build a ghost of themselves there that holds them (on a simulated set 97 % of such images were
    among the 10 % of smallest margins). Returns the new rotations (N, 3, 3), shifts (N, 2) px and classes (N,)."""
    ambiguous = margins.argsort()[: math.ceil(fraction * len(margins))]
    clear = torch.ones(len(margins), dtype=torch.bool, device=margins.device)
    clear[ambiguous] = False
    reconstruct(em, observed[clear], ctf[clear], rotations[clear], shifts[clear], classes[clear], radius_px, chunk)
    new_r, new_t, new_c = rotations.clone(), shifts.clone(), classes.clone()
    for part in ambiguous.split(chunk):
        new_r[part], new_t[part], new_c[part], _ = em.assign(observed[part], ctf[part], radius_px)
    return new_r, new_t, new_c


def real_space_maps(em: StochasticEM) -> torch.Tensor:
    """The class maps in real space on the padded grid, (K, G, G, G), voxels of the image's pixel size."""
    return ifft3_centered(em.volume_ft).real


def class_frames(em: StochasticEM, keep_fraction: float = 0.5) -> list[RigidFit]:
    """Each class map's rigid superposition onto class 0's map by their common part, in either hand
    (:func:`superpose`); class 0 gets the identity. After the split the class maps drift apart (rotation and
    translation leave the likelihood unchanged, and so does the hand), and one global frame is what users compare
    conformations in."""
    maps = real_space_maps(em)
    identity = RigidFit(torch.eye(3, device=em.device), torch.zeros(3, device=em.device), False, 1.0)
    return [identity] + [superpose(maps[0], maps[k], em.generator, keep_fraction)
                         for k in range(1, em.config.classes)]


def in_first_class_frame(rotations: torch.Tensor, shifts: torch.Tensor, classes: torch.Tensor,
                         frames: list[RigidFit]) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses of the images of class k re-expressed in class 0's frame (:func:`class_frames`).

    If ``V_k(R p + v) = V_0(p)``, the image at pose A and re-centring shift t (px) in map k is the image at pose
    ``A R`` and shift ``t - (A v)_xy`` in map 0. If ``V_k(-(R p + v)) = V_0(p)`` (the other hand), it is the point
    reflection of the image at pose ``A R`` shifted by ``-(A v)_xy``; a projection's point reflection is its
    180-degree in-plane turn, so: pose ``diag(-1, -1, 1) A R`` and shift ``t + (A v)_xy``.
    Returns rotations (N, 3, 3) and shifts (N, 2).
    """
    turn = torch.diag(torch.tensor([-1.0, -1.0, 1.0], device=rotations.device, dtype=rotations.dtype))
    new_r, new_t = rotations.clone(), shifts.clone()
    for k, frame in enumerate(frames):
        mine = classes == k
        moved = (rotations[mine] @ frame.translation)[:, :2]
        if frame.mirrored:
            new_r[mine], new_t[mine] = turn @ rotations[mine] @ frame.rotation, shifts[mine] + moved
        else:
            new_r[mine], new_t[mine] = rotations[mine] @ frame.rotation, shifts[mine] - moved
    return new_r, new_t
