"""The classical ab initio that teaches the encoder: poses and classes of a set of images from nothing.

Stages (each reported through ``progress``):

1. **Stochastic EM** (:class:`~cryofire.model.em_init.StochasticEM`) at low resolution from ``starts`` random starts;
   the start whose maps explain the images best (:func:`start_quality`: the explained power, plus what un-blending
   its classes would add) is kept. On simulated SNR-0.1 sets many runs end in a wrong optimum (bench/RESULTS.md),
   so starts matter; and many get one state right and another wrong, so the kept start's class maps may be swapped
   for other starts' (:func:`mixed_maps`) when the mixture's quality is higher.
2. **Global assignment** of every image (best pose, shift and class within ``end_radius_px``).
   The explained power of each class's images is reported (:func:`class_explained_power`): a class that sits in a
   wrong optimum while the others converged explains clearly less.
3. **Un-blending** (:func:`~cryofire.model.em_unblend.unblend`): a class map that holds one molecule in two frames
   (half its images far off about a common axis; a failure of the EM on a simulated set) is split into its two
   frames, and its images' poses are re-expressed in one.
4. **Refinement** (:func:`~cryofire.model.em_refine.refine`) while the radius grows to Nyquist, each round followed
   by the superposition of the class maps in class 0's frame (:func:`~cryofire.model.em_refine.class_frames`); the
   last round searches (by default) every image globally again.
5. **Reassignment** of the images whose class is least clear (:func:`~cryofire.model.em_refine.reassign_ambiguous`)
   against class maps rebuilt without them.

Spectra (N, M, 2), CTFs (N, M), rotations (RELION matrices) and shifts (re-centring, px) as in
:mod:`cryofire.model.em_init`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from cryofire.model.em_init import EMConfig, StochasticEM, best_of_classes
from cryofire.model.em_refine import (
    class_frames,
    class_margins,
    explained_fraction,
    in_first_class_frame,
    reassign_ambiguous,
    refine,
)
from cryofire.model.em_unblend import unblend

Progress = Callable[[str, dict, "tuple | None"], None]


def _no_progress(stage: str, info: dict, poses: tuple | None) -> None:
    """The :data:`Progress` of a caller that wants none."""


def _explained(em: StochasticEM, observed: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """:func:`~cryofire.model.em_refine.explained_fraction` (B, ...) of spectra (B, ..., M, 2) whose scores (B, ...)
    were computed within ``end_radius_px``."""
    count = em.lattice.count_within(em.config.end_radius_px)
    return explained_fraction(scores, observed[..., :count, :].to(scores.device))


def assign_all(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, radius_px: float, chunk: int = 500
               ) -> tuple[torch.Tensor, ...]:
    """:meth:`StochasticEM.assign` of every image in chunks: rotations, shifts, classes and scores."""
    parts = [em.assign(observed[part], ctf[part], radius_px)
             for part in torch.arange(len(observed), device=observed.device).split(chunk)]
    return tuple(torch.cat(values) for values in zip(*parts))


def start_quality(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor,
                  assignment: tuple[torch.Tensor, ...] | None = None) -> tuple[float, float]:
    """How well an EM start's maps explain a probe of the images (spectra (P, M, 2), CTF (P, M)): the mean fraction
    of the images' power that their best poses and classes within ``end_radius_px`` explain (``-score / |Y|^2``; a
    stochastic EM stuck in a wrong optimum explains less: on a simulated SNR-0.1 set 0.61-0.64 against 0.66-0.68 for
    runs that converged, and 0.71 for maps from the true poses), and the gain in the explained fraction that
    un-blending its classes would bring (:func:`~cryofire.model.em_unblend.unblend` on the probe images, maps rebuilt
    from their poses before and after; each class's gain weighted by its share of them; 0 when ``unblend_images`` is
    0). A start with a class that blends two frames of a molecule can be better than one whose class is poor in
    another way, yet explain less until it is un-blended (a simulated set's second start, bench/RESULTS.md, eleventh
    session). Neither draws from ``em``'s random stream beyond the assignment, which a caller that has made it
    (:meth:`StochasticEM.assign` at ``end_radius_px``: rotations, shifts, classes, scores) can pass in."""
    if assignment is None:
        assignment = em.assign(observed, ctf, em.config.end_radius_px)
    rotations, shifts, classes, scores = assignment
    explained = float(_explained(em, observed, scores).mean())
    if em.config.unblend_images == 0:
        return explained, 0.0
    *_, gains = unblend(em, observed, ctf, rotations, shifts, classes, em.config.end_radius_px)
    return explained, sum(gain * float((classes == k).float().mean()) for k, gain in gains.items())


def probe_rows(n_images: int, config: EMConfig) -> torch.Tensor:
    """The ``probe_images`` rows (P,) of ``n_images`` on which the EM starts are compared."""
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(config.seed))[: config.probe_images]


def em_start(observed: torch.Tensor, ctf: torch.Tensor, box_size: int, config: EMConfig, start: int,
             device: torch.device | str = "cpu", progress: Progress | None = None) -> StochasticEM:
    """Stochastic EM start number ``start`` (0-based; seed ``seed + 1000 * start``) on spectra (N, M, 2) and CTFs
    (N, M); ``progress`` gets ("em", diagnostics) every 100 iterations."""
    report = progress or _no_progress
    em = StochasticEM(box_size, len(observed), replace(config, seed=config.seed + 1000 * start), device)
    generator = torch.Generator().manual_seed(em.config.seed + 1)
    for iteration in range(config.iterations):
        rows = torch.randint(0, len(observed), (config.batch_size,), generator=generator)
        info = em.iterate(observed[rows], ctf[rows], rows)
        if iteration % 100 == 99:
            report("em", {"start": start + 1, "iteration": iteration + 1, **info}, None)
    return em


def best_em_start(observed: torch.Tensor, ctf: torch.Tensor, box_size: int, config: EMConfig,
                  device: torch.device | str = "cpu", progress: Progress | None = None) -> StochasticEM:
    """Stochastic EM from ``config.starts`` random starts (seeds ``seed + 1000 * start``); returns the one of best
    :func:`start_quality` (explained power plus un-blending gain) on ``probe_images`` of the images, or that start
    with class maps taken from other starts (:func:`mixed_maps`) where the mixture's quality is higher. ``progress``
    gets ("em", diagnostics) every 100 iterations, ("start", its explained power and gain) after each start, and
    ("mixed start", the same and the (start, class) of each map) for a mixture."""
    report = progress or _no_progress
    probe = probe_rows(len(observed), config)
    probe_observed, probe_ctf = observed[probe], ctf[probe]
    classes = torch.arange(config.classes)
    em, best, maps, per_class, qualities = None, 0, [], [], []  # the best start's EM; every start's maps and probe
    for start in range(config.starts):
        candidate = em_start(observed, ctf, box_size, config, start, device, report)
        found = candidate.assign_each_class(probe_observed, probe_ctf, config.end_radius_px)
        explained, gain = start_quality(candidate, probe_observed, probe_ctf, best_of_classes(*found, classes))
        report("start", {"start": start + 1, "explained_power": explained, "unblend_gain": gain}, None)
        if em is None or explained + gain > qualities[best]:
            em, best = candidate, start
        maps.append(candidate.volume_ft)
        per_class.append(found)
        qualities.append(explained + gain)
    if config.classes == 1:  # one class: another start's map is that start, compared already
        return em
    chosen = mixed_maps(em, probe_observed, per_class, best)
    if chosen is None:
        return em
    mixed = tuple(torch.cat([found[i] for found in per_class], 1)[:, chosen] for i in range(3))
    explained, gain = start_quality(em, probe_observed, probe_ctf, best_of_classes(*mixed, classes))
    report("mixed start", {"maps": [(c // config.classes + 1, c % config.classes) for c in chosen],
                           "explained_power": explained, "unblend_gain": gain}, None)
    if explained + gain > qualities[best]:
        em.volume_ft = torch.stack([maps[c // config.classes][c % config.classes] for c in chosen])
    return em


def mixed_maps(em: StochasticEM, observed: torch.Tensor, per_class: list[tuple[torch.Tensor, ...]], best: int
               ) -> list[int] | None:
    """The class maps of several EM starts pooled: starting from start ``best``'s own, each of the K maps in turn
    replaced by the pooled map that most raises the mean over the probe images (spectra (P, M, 2)) of each image's
    best explained fraction among the K, until no replacement raises it (:func:`swap_search`). ``per_class``: each
    start's :meth:`StochasticEM.assign_each_class` results for the probe (rotations, shifts, scores (P, K)).
    Returns the chosen maps' indices into the pool (start * K + class), or None if they are start ``best``'s own.

    Why: the EM often gets one state right and another wrong, and not always the same one. On a simulated SNR-0.1
    set none of six starts had both states' maps under 10° but four had one (each state's best map at 5.3° and 7.2°,
    from two starts), and of all pairs of the twelve maps the one explaining the probe best was those two (0.6675,
    against 0.6607 for the best start's own; bench/RESULTS.md, twentieth session)."""
    scores = torch.cat([scores for *_, scores in per_class], 1)  # (P, S * K)
    explained = _explained(em, observed[:, None], scores)
    own = [best * em.config.classes + k for k in range(em.config.classes)]
    chosen = swap_search(explained, own)
    return None if sorted(chosen) == own else chosen


def swap_search(explained: torch.Tensor, chosen: list[int]) -> list[int]:
    """Columns of ``explained`` (P, C) whose per-row maximum has the highest mean, by swaps from ``chosen``: each
    chosen column in turn replaced by the column that raises that mean most, until no swap raises it."""
    def value(columns: list[int]) -> float:
        return float(explained[:, columns].max(1).values.mean())

    chosen, best, improved = list(chosen), value(chosen), True
    while improved:
        improved = False
        for slot in range(len(chosen)):
            for column in range(explained.shape[1]):
                trial = chosen[:slot] + [column] + chosen[slot + 1:]
                if column not in chosen and value(trial) > best:
                    chosen, best, improved = trial, value(trial), True
    return chosen


def class_explained_power(em: StochasticEM, observed: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor
                          ) -> torch.Tensor:
    """Mean explained fraction (``-score / |Y|^2`` at ``end_radius_px``, scores (N,) of the global assignment) of
    each class's images: (K,), NaN for an empty class. A class that converged to a wrong optimum while the others
    did not explains clearly less (0.61-0.63 against 0.66-0.67 on a simulated SNR-0.1 set)."""
    explained = _explained(em, observed, scores)
    return torch.stack([explained[classes == k].mean() for k in range(em.config.classes)])


def initial_poses(observed: torch.Tensor, ctf: torch.Tensor, box_size: int, config: EMConfig,
                  device: torch.device | str = "cpu", progress: Progress | None = None
                  ) -> tuple[StochasticEM, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ab initio poses and classes of a set of images (the stages in the module's docstring), with
    ``refine_rounds`` refinement rounds as the radius grows from ``end_radius_px`` to Nyquist (D / 2).

    Args:
        observed: (N, M, 2) spectra at the first M half-plane points (M covering Nyquist), ``observed_spectrum``
            of the windowed images.
        ctf: (N, M) CTF values there.
        progress: called with a stage name, diagnostics and the current (rotations, shifts, classes) (None during
            the EM) every 100 EM iterations and after every later stage.

    Returns the EM state (its maps are those of the last round) and the rotations (N, 3, 3) RELION matrices,
    re-centring shifts (N, 2) px and classes (N,) of the images, on ``device``.
    """
    report = progress or _no_progress
    em = best_em_start(observed, ctf, box_size, config, device, report)
    rotations, shifts, classes, scores = assign_all(em, observed, ctf, config.end_radius_px)
    per_class = class_explained_power(em, observed, scores, classes)
    report("assign", {"radius_px": config.end_radius_px,
                      "class_explained_power": [round(float(v), 4) for v in per_class]}, (rotations, shifts, classes))
    if config.unblend_images > 0:
        rotations, shifts, gains = unblend(em, observed, ctf, rotations, shifts, classes, config.end_radius_px)
        report("unblend", {"classes_changed": list(gains), "explained_gain": [round(g, 4) for g in gains.values()]},
               (rotations, shifts, classes))
    rounds = max(config.refine_rounds, 1)
    for index in range(rounds):
        radius = config.end_radius_px + (box_size / 2 - config.end_radius_px) * min(index / max(rounds - 2, 1), 1.0)
        fraction = config.final_research_fraction if index == rounds - 1 else config.research_fraction
        rotations, shifts, classes, class_scores = refine(em, observed, ctf, rotations, shifts, classes, radius,
                                                          fraction)
        rotations, shifts = in_first_class_frame(rotations, shifts, classes, class_frames(em))
        report("refine", {"round": index + 1, "radius_px": radius}, (rotations, shifts, classes))
    if config.classes > 1 and config.ambiguous_fraction > 0:
        margins = class_margins(class_scores, observed, em.lattice.count_within(radius))  # the last round's scores
        rotations, shifts, classes = reassign_ambiguous(em, observed, ctf, rotations, shifts, classes, margins,
                                                        config.ambiguous_fraction, radius)
        report("reassign", {"images": math.ceil(config.ambiguous_fraction * len(observed))},
               (rotations, shifts, classes))
    return em, rotations, shifts, classes
