"""Un-blending a class map that holds one molecule in two frames, a failure of the stochastic EM.

On a simulated SNR-0.1 set the stochastic EM's map of one state was poor from all six starts tried. In one of them
the map was a blend: about half of the state's images sat near their true poses, the others 100-160° off,
consistent with the molecule's mirror image, and each half was consistent with itself (a map from either half
alone re-assigns its images at 6°; the blend holds them at 24°; bench/RESULTS.md, tenth session). Hard-assignment
refinement cannot leave a blend: each half keeps its frame.

:func:`unblend` splits each class's images in two at random and refines the two halves as two classes by local
searches (:func:`~cryofire.model.em_refine.refine`, a k-means of poses and maps): the frames separate. If the two
sub-maps are one molecule in two frames (superposed, :func:`~cryofire.model.em_refine.class_frames`, by a turn of
more than ``min_angle_deg`` or in the other hand), every image of the class is searched locally in both and
re-expressed in the first sub-map's frame; the class keeps these poses if a map rebuilt from them explains its
images better than a map rebuilt from the old ones.

Spectra, CTFs, rotations and shifts as in :mod:`cryofire.model.em_init`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from cryofire.model.em_init import StochasticEM
from cryofire.model.superpose import RigidFit
from cryofire.model.em_refine import (
    class_frames,
    explained_fraction,
    in_first_class_frame,
    local_in_every_class,
    reconstruct,
    refine,
)
from cryofire.physics import geodesic_distance_deg


def _local_in_chunks(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                     shifts: torch.Tensor, count: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """:func:`~cryofire.model.em_refine.local_in_every_class` over ``chunk`` images at a time: rotations
    (n, K, 3, 3), shifts (n, K, 2) and scores (n, K)."""
    found = [local_in_every_class(em, observed[part], ctf[part], rotations[part], shifts[part], count)
             for part in torch.arange(len(observed), device=em.device).split(chunk)]
    return tuple(torch.cat(values) for values in zip(*found))


@torch.no_grad()
def mean_explained(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                   shifts: torch.Tensor, radius_px: float, chunk: int = 500
                   ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One map rebuilt within ``radius_px`` from the images' poses (rotations (N, 3, 3), shifts (N, 2) px) into
    ``em`` (one class), then each image's best pose near its own in it: the mean :func:`explained_fraction`, and
    the new rotations (N, 3, 3) and shifts (N, 2)."""
    one = torch.zeros(len(observed), dtype=torch.long, device=em.device)
    reconstruct(em, observed, ctf, rotations, shifts, one, radius_px, chunk)
    count = em.lattice.count_within(radius_px)
    new_r, new_t, scores = (values[:, 0] for values in _local_in_chunks(em, observed, ctf, rotations, shifts, count,
                                                                        chunk))
    return float(explained_fraction(scores, observed[:, :count].to(em.device)).mean()), new_r, new_t


@torch.no_grad()
def split_frames(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                 shifts: torch.Tensor, radius_px: float, rounds: int, generator: torch.Generator
                 ) -> StochasticEM | None:
    """Two sub-maps of one class's images (spectra (n, M, 2) and CTF (n, M), poses rotations (n, 3, 3) and shifts
    (n, 2) px): a random split refined ``rounds`` times as two classes within ``radius_px``, by local searches
    (on a simulated set's blend 12 rounds put 94-95 % of 1,355 images in their frame's half, from two random splits;
    with a global re-search of the worst-fitting 30 % each round, 6 rounds did it once in two). Returns the
    two-class EM state holding them, or None if a half emptied (under a tenth of the images)."""
    sub = StochasticEM(em.size, 0, replace(em.config, classes=2), em.device)
    halves = torch.randint(0, 2, (len(observed),), generator=generator).to(em.device)
    for _ in range(rounds):  # local searches only (see above)
        rotations, shifts, halves, _ = refine(sub, observed, ctf, rotations, shifts, halves, radius_px, 0.0)
    if torch.bincount(halves, minlength=2).min() < len(observed) / 10:
        return None
    reconstruct(sub, observed, ctf, rotations, shifts, halves, radius_px)
    return sub


def _two_frames(sub: StochasticEM, min_angle_deg: float) -> list[RigidFit] | None:
    """The two sub-maps' frames (:func:`~cryofire.model.em_refine.class_frames`) if they hold one molecule in two
    frames: the second in the other hand, or turned by at least ``min_angle_deg``; else None."""
    frames = class_frames(sub)
    turn = float(geodesic_distance_deg(frames[1].rotation, torch.eye(3, device=sub.device)))
    return frames if frames[1].mirrored or turn >= min_angle_deg else None


@torch.no_grad()
def unblend_class(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                  shifts: torch.Tensor, radius_px: float, sample: int, rounds: int, min_angle_deg: float,
                  generator: torch.Generator, tries: int = 1, chunk: int = 500
                  ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """New poses of one class's images (spectra (n, M, 2), CTF (n, M), rotations (n, 3, 3), shifts (n, 2) px) if
    its map blends two frames of one molecule (the module's docstring), from a split of ``sample`` of them, and by
    how much more of the images' power (:func:`mean_explained`) a map from them explains; None if it does not blend
    two frames, or if the new poses explain the images no better. Up to ``tries`` random splits are refined until
    one finds two frames (a blend of 457 images: 5 of 6 splits did; bench/RESULTS.md, eleventh session).
    ``generator`` draws the sample and the splits (not ``em``'s own, so that a class left alone leaves the rest of
    the ab initio as it was)."""
    chosen = torch.randperm(len(observed), generator=generator)[:sample].to(em.device)
    frames = None
    for _ in range(tries):
        sub = split_frames(em, observed[chosen], ctf[chosen], rotations[chosen], shifts[chosen], radius_px, rounds,
                           generator)
        frames = None if sub is None else _two_frames(sub, min_angle_deg)
        if frames is not None:
            break
    if frames is None:
        return None
    per_half_r, per_half_t, scores = _local_in_chunks(sub, observed, ctf, rotations, shifts,
                                                      em.lattice.count_within(radius_px), chunk)
    halves = scores.argmin(1)
    index = torch.arange(len(observed), device=em.device)
    new_r, new_t = in_first_class_frame(per_half_r[index, halves], per_half_t[index, halves], halves, frames)
    one = StochasticEM(em.size, 0, replace(em.config, classes=1), em.device)
    before, *_ = mean_explained(one, observed, ctf, rotations, shifts, radius_px, chunk)
    after, new_r, new_t = mean_explained(one, observed, ctf, new_r, new_t, radius_px, chunk)
    return (new_r, new_t, after - before) if after > before else None


@torch.no_grad()
def unblend(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
            shifts: torch.Tensor, classes: torch.Tensor, radius_px: float
            ) -> tuple[torch.Tensor, torch.Tensor, dict[int, float]]:
    """:func:`unblend_class` for every class (``em.config``: ``unblend_images``, ``unblend_rounds``,
    ``unblend_angle_deg``, ``unblend_tries``) of images with spectra (N, M, 2), CTF (N, M), rotations (N, 3, 3),
    shifts (N, 2) px and classes (N,). Returns the rotations and shifts, and for each class whose poses changed the
    gain in the mean explained fraction of its images."""
    cfg = em.config
    generator = torch.Generator().manual_seed(cfg.seed)
    rotations, shifts, changed = rotations.clone(), shifts.clone(), {}
    for k in range(cfg.classes):
        mine = (classes == k).nonzero().squeeze(1)
        if len(mine) < 2:
            continue
        found = unblend_class(em, observed[mine], ctf[mine], rotations[mine], shifts[mine], radius_px,
                              cfg.unblend_images, cfg.unblend_rounds, cfg.unblend_angle_deg, generator,
                              cfg.unblend_tries)
        if found is not None:
            rotations[mine], shifts[mine], changed[k] = found
    return rotations, shifts, changed
