"""Classical ab initio poses and classes, to teach the amortized encoder where to start: the stochastic EM and the
pose search it shares with the refinement (the stages are run by :mod:`cryofire.model.ab_initio`).

Why: an encoder trained through the image loss alone did not find poses at SNR 0.1 in a few hundred thousand
images (docs/method.md), while the images do carry the information (with the true maps, a 4° rotation costs a
typical D=32 image ~10 units of log-likelihood; bench/RESULTS.md). Classical ab initio (cryoSPARC's SGD, RELION's
initial model) finds it by comparing each image with projections in many orientations:

1. **Stochastic EM** (:class:`StochasticEM`) on minibatches, at low resolution (radius ``start`` -> ``end`` px):
   ``K`` class maps on a 2x zero-padded Fourier grid (trilinear slices of an unpadded map are inaccurate). E step:
   posterior weights over (class, rotation, shift) hypotheses -- fresh random rotations plus perturbations of the
   image's last best rotation (its *memory*: without it the posterior cannot resolve poses finer than the random
   grid) -- tempered by ``beta`` rising to 1, under a per-shell noise variance re-estimated from the residuals.
   M step: the weighted, CTF-multiplied spectra are inserted by the exact adjoint of the trilinear slice; the sums
   decay by ``1 - forgetting`` (online EM), the map is their Wiener ratio, masked by a soft sphere.
2. **One frame**: the classes share one map for the first ``split_fraction`` of the iterations, then split (a few
   iterations of random hard class assignments break the symmetry), so all start in one frame; as they drift apart
   (by degrees and pixels, or into the other hand: a projection cannot tell), each refinement round superposes every
   class map or its mirror image on class 0's by their common (rigid) part, from a global search, and re-expresses
   the poses and shifts of its images in class 0's frame (``em_refine.class_frames``).
3. **Search** (:meth:`StochasticEM.assign`, :meth:`StochasticEM.local_search`): global then local searches of each
   image's best pose, shift and class in the class maps, used by the assignment and the refinement
   (``em_refine.refine``: the maps rebuilt from hard assignments, every image's best pose near its current one in
   every class map, or from a fresh global search for the images that fit worst).

Spectra are the model's half-plane lattice values (``HalfPlaneLattice``, scaled by 1/D) of the windowed images;
rotations are RELION matrices (slice point ``A^T k``); shifts are re-centring shifts in px (RELION origin sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryofire.model.image_formation import HalfPlaneLattice, recentre
from cryofire.model.em_refine import friedel_symmetrise
from cryofire.model.pose_search import shift_grid
from cryofire.model.trilinear import insert_slices, sample_slices
from cryofire.physics import axis_angle_to_matrix, fft3_centered, ifft3_centered, random_rotations
from cryofire.physics.lattice import frequency_grid_3d

PADDING = 2  # the maps live on (2D)^3 grids


@dataclass(frozen=True)
class EMConfig:
    """Schedule of the EM initialisation (radii and shifts in lattice px of the training box D; angles in degrees).

    The E steps try re-centring shifts up to ``max_shift_px`` (a coarse map needs no more); the global assignment and
    the refinement's re-search try shifts up to ``search_shift_px``, which must cover the particles' offsets (an
    image whose particle sits further out is given a wrong pose: 55 % of those beyond 3 px on the simulated set).
    Each refinement round but the last searches globally again the ``research_fraction`` of the images that fit worst
    after the local search (``em_refine.worst_fits``; the worst 40 % held ~88 % of the images > 20° off on a simulated
    set); the last round searches the ``final_research_fraction`` (all, by default): images of one state at a wrong
    pose in the other state's map fit no worse than the rest, so only a search of every image finds them (2.8 % of
    a simulated set's images, ~30° off; bench/RESULTS.md, ninth session). After it, the ``ambiguous_fraction`` of
    the images whose best pose in their class fits least better than their best pose in another class are searched
    again in class maps rebuilt without them (``em_refine.reassign_ambiguous``).
    The stochastic EM runs from ``starts`` random starts (half of them ended in a wrong optimum on one simulated set);
    the one whose maps explain ``probe_images`` of the images best, once un-blended, is kept
    (``ab_initio.start_quality``). After the global assignment each class map is checked for a blend of two frames
    of one molecule (``em_unblend``: ``unblend_images`` of its images split in two and refined ``unblend_rounds``
    times, up to ``unblend_tries`` random splits; the halves' maps one molecule turned by more than
    ``unblend_angle_deg`` or in the other hand); ``unblend_images = 0`` skips it.
    """

    iterations: int = 700
    batch_size: int = 64
    classes: int = 2
    rotations: int = 2048
    local_candidates: int = 64
    local_angle_deg: float = 10.0
    start_radius_px: float = 3.0
    end_radius_px: float = 8.0
    max_shift_px: float = 3.0
    search_shift_px: float = 6.0
    shift_step_px: float = 1.0
    forgetting_start: float = 0.2
    forgetting_end: float = 0.02
    beta_start: float = 0.01
    beta_end: float = 1.0
    wiener: float = 0.1
    mask_fraction: float = 0.85
    split_fraction: float = 0.3
    split_iterations: int = 20
    refine_rounds: int = 7
    starts: int = 4
    probe_images: int = 1000
    research_fraction: float = 0.3
    final_research_fraction: float = 1.0
    ambiguous_fraction: float = 0.05
    unblend_images: int = 2000
    unblend_rounds: int = 12
    unblend_angle_deg: float = 20.0
    unblend_tries: int = 2
    seed: int = 0


def fit_scores(observed: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor, coords: torch.Tensor,
               shifts_px: torch.Tensor) -> torch.Tensor:
    """``sum_k |c_ik P_hk - Y_ik(t)|^2 - |Y_i|^2`` for every image, hypothesis h and shift t: (B, H, T).

    Args:
        observed: (B, n, 2) spectra; ctf: (B, n); coords: (n, 2) cycles/px;
        slices: (H, n, 2) shared by all images, or (B, H, n, 2) per image;
        shifts_px: (T, 2) or (B, T, 2) re-centring shifts.
    """
    batch = observed.shape[0]
    shifts = shifts_px.expand(batch, -1, -1) if shifts_px.dim() == 2 else shifts_px
    moved = recentre(observed, coords, shifts) * ctf[:, None, :, None]  # (B, T, n, 2)
    if slices.dim() == 3:
        power = ctf.square() @ slices.square().sum(-1).T  # (B, H)
        cross = torch.einsum("btnc,hnc->bht", moved, slices)
    else:
        power = (slices.square().sum(-1) * ctf[:, None].square()).sum(-1)
        cross = torch.einsum("btnc,bhnc->bht", moved, slices)
    return power[:, :, None] - 2.0 * cross


def best_of_classes(rotations: torch.Tensor, shifts: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor
                    ) -> tuple[torch.Tensor, ...]:
    """Each image's best class of :meth:`StochasticEM.assign_each_class`'s results (rotations (B, K, 3, 3), shifts
    (B, K, 2) px, scores (B, K), for the class numbers ``classes`` (K,)): rotations (B, 3, 3), shifts (B, 2),
    classes (B,) and scores (B,)."""
    best = scores.argmin(1)
    index = torch.arange(len(scores), device=scores.device)
    return rotations[index, best], shifts[index, best], classes.to(scores.device)[best], scores[index, best]


class StochasticEM:
    """Class maps, their running sums, the noise spectrum and each image's remembered rotation."""

    def __init__(self, box_size: int, n_images: int, config: EMConfig, device: torch.device | str = "cpu") -> None:
        self.size, self.config, self.device = box_size, config, torch.device(device)
        self.grid_size = grid = PADDING * box_size
        self.lattice = HalfPlaneLattice(box_size).to(self.device)
        self.sums = torch.zeros(config.classes, 3, grid, grid, grid, device=self.device)  # Re, Im, weight
        self.volume_ft = torch.zeros(config.classes, grid, grid, grid, dtype=torch.complex64, device=self.device)
        self.shell = self.lattice.radius_px.round().long()  # (M,) shell of each half-plane point
        self.shell_variance: torch.Tensor | None = None  # (D // 2 + 1,)
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.memory = random_rotations(n_images, generator=self.generator).float().to(self.device)
        self.shifts = shift_grid(config.max_shift_px, config.shift_step_px).to(self.device)  # (T, 2) px
        self.search_shifts = shift_grid(config.search_shift_px, config.shift_step_px).to(self.device)
        self.radius_px_3d = frequency_grid_3d(grid, device=self.device).norm(dim=-1) * box_size
        offsets = torch.arange(grid, device=self.device, dtype=torch.float32) - grid // 2
        real_radius = (offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None] ** 2).sqrt()
        edge = config.mask_fraction * box_size / 2
        self.mask = 0.5 * (1 + torch.cos(math.pi * ((real_radius - edge) / 3.0).clamp(0, 1)))

    # --- schedule -------------------------------------------------------------------------------------------------
    def _progress(self) -> float:
        return min(self.iteration / max(self.config.iterations - 1, 1), 1.0)

    def radius_px(self) -> float:
        cfg = self.config
        return cfg.start_radius_px + (cfg.end_radius_px - cfg.start_radius_px) * self._progress()

    def _forgetting(self) -> float:
        cfg = self.config
        return cfg.forgetting_start * (cfg.forgetting_end / cfg.forgetting_start) ** self._progress()

    def _beta(self) -> float:
        return self.config.beta_start + (self.config.beta_end - self.config.beta_start) * self._progress()

    # --- slices ---------------------------------------------------------------------------------------------------
    def _points(self, rotations: torch.Tensor, count: int) -> torch.Tensor:
        """Padded-grid lattice points ``A^T k`` (..., count, 3) of rotations (..., 3, 3)."""
        return (self.lattice.coords[:count] * self.grid_size) @ rotations[..., :2, :]

    def _class_slices(self, points: torch.Tensor, classes: range | list[int] | None = None) -> torch.Tensor:
        """The class maps (default all) at points (J, n, 3): (K * J, n, 2), class-major."""
        volumes = self.volume_ft if classes is None else self.volume_ft[list(classes)]
        return torch.cat([sample_slices(torch.view_as_real(v).permute(3, 0, 1, 2), points) for v in volumes])

    def _perturbed(self, rotations: torch.Tensor, count: int, angle_deg: float, keep_first: bool = False
                   ) -> torch.Tensor:
        """``count`` random perturbations (B, count, 3, 3) of each rotation (B, 3, 3): axis-angle vectors with a
        per-component std of ``angle_deg / sqrt(3)``; with ``keep_first`` the first is the rotation itself."""
        axis_angle = torch.randn(len(rotations), count, 3, generator=self.generator).to(self.device)
        axis_angle *= math.radians(angle_deg) / math.sqrt(3)
        if keep_first:
            axis_angle[:, 0] = 0.0
        return axis_angle_to_matrix(axis_angle) @ rotations[:, None]

    # --- EM -------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def iterate(self, observed: torch.Tensor, ctf: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
        """One E and M step on a minibatch: spectra (B, M, 2) and CTF (B, M) at the lattice's first M points
        (M >= the current count) of the images ``rows`` (B,); returns diagnostics."""
        cfg = self.config
        count = self.lattice.count_within(self.radius_px())
        coords = self.lattice.coords[:count]
        observed, ctf, rows = observed[:, :count].to(self.device), ctf[:, :count].to(self.device), rows.to(self.device)
        batch = len(observed)
        global_rotations = random_rotations(cfg.rotations, generator=self.generator).float().to(self.device)
        local_rotations = self._perturbed(self.memory[rows], cfg.local_candidates, cfg.local_angle_deg)  # (B, L)
        global_points = self._points(global_rotations, count)  # (J, n, 3)
        local_points = self._points(local_rotations, count).reshape(-1, count, 3)  # (B * L, n, 3)
        shifts = self.shifts
        if self.shell_variance is None:  # start from the data's own power: a cautious (flat) posterior
            self.shell_variance = self.per_shell_mean(observed.square().sum(-1).mean(0), count)
        sigma = self.shell_variance[self.shell[:count]].sqrt()[:, None]
        if self.iteration == 0:  # no map yet: each image near its remembered (random) rotation, unshifted
            weights = torch.zeros(batch, cfg.classes, cfg.rotations + cfg.local_candidates, len(shifts),
                                  device=self.device)
            klass = torch.randint(0, cfg.classes, (batch,), generator=self.generator).to(self.device)
            weights[torch.arange(batch), klass, cfg.rotations, shifts.norm(dim=-1).argmin()] = 1.0
        else:
            global_slices = self._class_slices(global_points)  # (K * J, n, 2)
            local_slices = self._class_slices(local_points).reshape(cfg.classes, batch, -1, count, 2)
            scores = torch.cat((
                fit_scores(observed / sigma, ctf, global_slices / sigma, coords, shifts).reshape(
                    batch, cfg.classes, cfg.rotations, -1),
                fit_scores(observed / sigma, ctf, local_slices.transpose(0, 1).flatten(1, 2) / sigma, coords,
                           shifts).reshape(batch, cfg.classes, cfg.local_candidates, -1)), dim=2)
            weights = torch.softmax(-self._beta() * scores.flatten(1), dim=-1).reshape(scores.shape)
            if 0 <= self.iteration - self._split_iteration() < cfg.split_iterations:  # break the classes' symmetry
                klass = torch.randint(0, cfg.classes, (batch,), generator=self.generator).to(self.device)
                weights = weights * torch.nn.functional.one_hot(klass, cfg.classes)[:, :, None, None]
                weights = weights / weights.sum((1, 2, 3), keepdim=True).clamp_min(1e-30)
            self._update_shell_variance(observed, ctf, scores, global_slices, local_slices, shifts, count)
        best = weights.sum((1, 3)).argmax(1)  # (B,) over global then local rotations
        is_local = best >= cfg.rotations
        chosen_local = local_rotations[torch.arange(batch), (best - cfg.rotations).clamp_min(0)]
        self.memory[rows] = torch.where(is_local[:, None, None], chosen_local,
                                        global_rotations[best.clamp_max(cfg.rotations - 1)])
        self._maximise(observed, ctf, weights, global_points, local_points, shifts, count)
        self.iteration += 1
        return {"radius_px": float(self.lattice.radius_px[count - 1]), "beta": self._beta(),
                "max_weight_median": float(weights.flatten(1).max(1).values.median())}

    def per_shell_mean(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """Mean of per-point values (n,) in each radius shell: (D // 2 + 1,); empty outer shells copy the last."""
        shells = self.size // 2 + 1
        total = torch.zeros(shells, device=self.device).index_add_(0, self.shell[:count], values)
        number = torch.zeros(shells, device=self.device).index_add_(0, self.shell[:count], torch.ones_like(values))
        mean = total / number.clamp_min(1)
        last = int(self.shell[count - 1])
        mean[last + 1:] = mean[last]
        return mean

    def _update_shell_variance(self, observed: torch.Tensor, ctf: torch.Tensor, scores: torch.Tensor,
                               global_slices: torch.Tensor, local_slices: torch.Tensor, shifts: torch.Tensor,
                               count: int) -> None:
        """Running per-shell mean squared residual at each image's most likely hypothesis (RELION's sigma2 noise
        spectrum, here including the maps' misfit)."""
        batch, classes, hypotheses, n_shifts = scores.shape
        best = scores.flatten(1).argmin(1)
        shift = shifts[best % n_shifts]
        klass, rotation = (best // n_shifts) // hypotheses, (best // n_shifts) % hypotheses
        n_global = self.config.rotations
        from_global = global_slices.reshape(classes, n_global, count, 2)[klass, rotation.clamp_max(n_global - 1)]
        from_local = local_slices[klass, torch.arange(batch), (rotation - n_global).clamp_min(0)]
        slices = torch.where((rotation >= n_global)[:, None, None], from_local, from_global)
        moved = recentre(observed, self.lattice.coords[:count], shift[:, None])[:, 0]
        residual = (moved - ctf[..., None] * slices).square().sum(-1).mean(0)  # (n,)
        self.shell_variance = 0.5 * self.shell_variance + 0.5 * self.per_shell_mean(residual, count)

    def _maximise(self, observed: torch.Tensor, ctf: torch.Tensor, weights: torch.Tensor,
                  global_points: torch.Tensor, local_points: torch.Tensor, shifts: torch.Tensor, count: int) -> None:
        """Weights (B, K, J + L, T): add the weighted spectra to the decayed sums and rebuild the maps."""
        cfg = self.config
        batch = len(observed)
        moved = recentre(observed, self.lattice.coords[:count], shifts.expand(batch, -1, -1)) * ctf[:, None, :, None]
        global_w, local_w = weights[:, :, :cfg.rotations], weights[:, :, cfg.rotations:]
        global_values = torch.cat((torch.einsum("bkjt,btnc->kjnc", global_w, moved),
                                   torch.einsum("bkj,bn->kjn", global_w.sum(-1), ctf.square())[..., None]), -1)
        local_weight = local_w.sum(-1).permute(1, 0, 2)[..., None] * ctf.square()[None, :, None]  # (K, B, L, n)
        local_values = torch.cat((torch.einsum("bklt,btnc->kblnc", local_w, moved), local_weight[..., None]),
                                 -1).flatten(1, 2)  # (K, B * L, n, 3)
        values = torch.cat((global_values, local_values), 1)
        points = torch.cat((global_points, local_points))
        self.sums.mul_(1.0 - self._forgetting())
        for k in range(cfg.classes):
            self.sums[k].add_(friedel_symmetrise(insert_slices(values[k], points, self.grid_size)))
        if self.iteration < self._split_iteration():  # one shared map: every class in the same frame
            self.sums[:] = self.sums.mean(0, keepdim=True)
        self.update_maps(count)

    def _split_iteration(self) -> int:
        return int(self.config.split_fraction * self.config.iterations)

    def update_maps(self, count: int) -> None:
        """Class maps = Wiener ratio of the sums, masked in real space, zero beyond the fitted radius."""
        radius = float(self.lattice.radius_px[count - 1])
        inside = self.radius_px_3d <= radius + 1.0
        for k, sums in enumerate(self.sums):
            regulariser = self.config.wiener * sums[2][inside].mean().clamp_min(1e-12)
            volume_ft = torch.complex(sums[0], sums[1]) / (sums[2] + regulariser)
            volume = ifft3_centered(volume_ft * inside).real * self.mask
            self.volume_ft[k] = (fft3_centered(volume) * inside).to(torch.complex64)

    # --- assignment and refinement -------------------------------------------------------------------------------
    def assign(self, observed: torch.Tensor, ctf: torch.Tensor, radius_px: float, n_rotations: int = 8192,
               local_rounds: int = 3, candidates: int = 48, only_class: int | None = None, keep: int = 8,
               global_radius_px: float = 7.0) -> tuple[torch.Tensor, ...]:
        """Most likely pose and class of each image (:meth:`assign_each_class`, the class whose pose fits best):
        rotations (B, 3, 3), shifts (B, 2) px, classes (B,) and scores (B,)."""
        per_class = self.assign_each_class(observed, ctf, radius_px, n_rotations, local_rounds, candidates,
                                           only_class, keep, global_radius_px)
        searched = torch.as_tensor(range(self.config.classes) if only_class is None else [only_class],
                                   device=self.device)
        return best_of_classes(*per_class, searched)

    @torch.no_grad()
    def assign_each_class(self, observed: torch.Tensor, ctf: torch.Tensor, radius_px: float, n_rotations: int = 8192,
                          local_rounds: int = 3, candidates: int = 48, only_class: int | None = None, keep: int = 8,
                          global_radius_px: float = 7.0) -> tuple[torch.Tensor, ...]:
        """Most likely pose of each image (spectra (B, M, 2), CTF (B, M)) in each class map: a global search over
        ``n_rotations`` random rotations and the grid of shifts up to ``search_shift_px`` in each class map (or only
        ``only_class``) within ``min(radius_px, global_radius_px)``; in each class, local searches from the ``keep``
        best rotations (the true basin is often not the best on a coarse grid), polished briefly at the search
        radius; the best of them then within ``radius_px``. Each class keeps its own candidates: pooled, the other
        class's many near-equal ones crowd out the right class's (images in the wrong class of a simulated set: 67 %
        found their class pooled, 81 % with 8 candidates per class; bench/RESULTS.md, ninth session).

        Returns rotations (B, K, 3, 3), shifts (B, K, 2) px and scores (B, K) (:func:`fit_scores`) at ``radius_px``
        for the K searched classes.
        """
        count = self.lattice.count_within(min(radius_px, global_radius_px))
        coords = self.lattice.coords[:count]
        rotations = random_rotations(n_rotations, generator=self.generator).float().to(self.device)
        searched = list(range(self.config.classes)) if only_class is None else [only_class]
        slices = self._class_slices(self._points(rotations, count), searched)
        spectra, weights = observed[:, :count].to(self.device), ctf[:, :count].to(self.device)
        parts = [fit_scores(spectra[part], weights[part], slices, coords, self.search_shifts).min(-1)
                 for part in torch.arange(len(observed), device=self.device).split(64)]  # (b, H, T): bounded memory
        scores, best_shift = (torch.cat(values).view(len(observed), len(searched), n_rotations)
                              for values in zip(*parts))  # (B, K, J) best over the shifts
        keep = min(keep, n_rotations)
        hypotheses = scores.topk(keep, dim=2, largest=False).indices  # (B, K, keep)
        batch, n_classes = len(observed), len(searched)
        start_r = rotations[hypotheses].flatten(0, 2)
        start_t = self.search_shifts[best_shift.gather(2, hypotheses)].flatten(0, 2)
        start_c = torch.as_tensor(searched, device=self.device)[:, None].expand(n_classes, keep)
        start_c = start_c.expand(batch, n_classes, keep).flatten()
        angle_deg = math.degrees((8 * math.pi**2 / n_rotations) ** (1 / 3))
        repeats = n_classes * keep
        # every hypothesis polished coarsely at the search radius; each class's best then at the full radius
        r, t, c, score = self._local_by_class(observed.repeat_interleave(repeats, 0), ctf.repeat_interleave(repeats, 0),
                                              start_r, start_t, start_c, count, angle_deg, 2, candidates // 2)
        winners = (score.view(batch * n_classes, keep).argmin(1)
                   + torch.arange(batch * n_classes, device=self.device) * keep)  # (B * K,), image-major
        r, t, _, score = self._local_by_class(observed.repeat_interleave(n_classes, 0),
                                              ctf.repeat_interleave(n_classes, 0), r[winners], t[winners],
                                              c[winners], self.lattice.count_within(radius_px), angle_deg / 4,
                                              local_rounds, candidates)
        return r.view(batch, n_classes, 3, 3), t.view(batch, n_classes, 2), score.view(batch, n_classes)

    def _local_by_class(self, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                        shifts: torch.Tensor, classes: torch.Tensor, count: int, angle_deg: float, rounds: int,
                        candidates: int) -> tuple[torch.Tensor, ...]:
        """:meth:`local_search` of each image (spectra (B, M, 2)) in its own class map at the first ``count``
        points; returns rotations, shifts, classes and scores."""
        rotations, shifts = rotations.clone(), shifts.clone()
        scores = torch.empty(len(observed), device=self.device)
        spectra, weights = observed[:, :count].to(self.device), ctf[:, :count].to(self.device)
        for k in classes.unique().tolist():
            mine = classes == k
            rotations[mine], shifts[mine], scores[mine] = self.local_search(
                k, spectra[mine], weights[mine], rotations[mine], shifts[mine], angle_deg,
                self.config.shift_step_px, rounds, candidates)
        return rotations, shifts, classes, scores

    def local_search(self, klass: int, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                     shifts: torch.Tensor, angle_deg: float, step_px: float, rounds: int, candidates: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rounds`` of random rotation perturbations (within ``angle_deg``, halving) x a 5-point shift stencil
        (``step_px``, halving) around each image's pose in one class map; keeps the best (the current pose is
        always a candidate). Returns rotations (B, 3, 3), shifts (B, 2) and scores (B,)."""
        count = observed.shape[1]
        coords = self.lattice.coords[:count]
        channels = torch.view_as_real(self.volume_ft[klass]).permute(3, 0, 1, 2)
        batch = len(observed)
        index = torch.arange(batch, device=self.device)
        stencil = torch.tensor([[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1]], device=self.device)
        for _ in range(rounds):
            trial = self._perturbed(rotations, candidates, angle_deg, keep_first=True)  # (B, C, 3, 3)
            trial_shifts = shifts[:, None] + stencil * step_px  # (B, S, 2)
            slices = sample_slices(channels, self._points(trial, count).reshape(-1, count, 3))
            scores = fit_scores(observed, ctf, slices.reshape(batch, candidates, count, 2), coords, trial_shifts)
            score, best = scores.flatten(1).min(1)
            rotations = trial[index, best // len(stencil)]
            shifts = trial_shifts[index, best % len(stencil)]
            angle_deg, step_px = angle_deg / 2, step_px / 2
        return rotations, shifts, score
