"""Experiment (issue 3): can classical stochastic EM find ab initio poses for the encoder to learn from? Not yet.

    python bench/abinit_em.py identifiability --star /work/bench-data/acc32/prep/train.star
    python bench/abinit_em.py em --star /work/bench-data/acc32/prep/train.star --iterations 120

``identifiability``: a map reconstructed from the TRUE poses of 5,000 images, low-passed to radius r, then the best
pose of 400 images by global search (4,096 random rotations x shifts, then local refinement): the median rotation
error says how much pose information the images carry up to r. ``em``: stochastic EM from a random map (below), the
rotation error of 500 images every 10 iterations. Results in bench/RESULTS.md ("Ab initio by stochastic EM").

Why: an amortized encoder trained through the image loss alone did not find poses in a few hundred thousand images
(docs/method.md). Classical ab initio (cryoSPARC's SGD, RELION's initial model) compares each image with projections
in all orientations and lets it contribute to the map in proportion to how well each fits; its poses could teach the
encoder. This is that, at low resolution.

Model. Image i's half-plane spectrum Y_i (``HalfPlaneLattice``, within the radius) is the CTF c_i times the central
slice P_j of the map at rotation R_j, re-centred by a shift t, plus Gaussian noise whose variance per radius shell is
re-estimated from the residuals at each image's most likely pose (RELION's sigma2 spectrum, model misfit included).
One iteration on a minibatch: E: posterior weights w_ijt over J fresh random rotations and a shift grid (tempered by
beta <= 1); M: A_j = sum_it w_ijt c_i Y_i(t), W_j = sum_it w_ijt c_i^2, inserted into a 2x zero-padded 3D grid by the
exact adjoint of the trilinear slice (autograd through ``grid_sample``), Friedel-symmetrised; the sums decay by
(1 - forgetting) per iteration (online EM); map = sum A / (sum W + wiener * mean W), masked by a soft sphere in real
space and low-passed to the radius, which grows linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryofire.model.image_formation import HalfPlaneLattice, recentre
from cryofire.model.pose_search import shift_grid
from cryofire.physics import axis_angle_to_matrix, fft3_centered, ifft3_centered, random_rotations
from cryofire.physics.lattice import frequency_grid_3d


PADDING = 2  # the map lives on a (2D)^3 grid: trilinear slices of a zero-padded map are accurate


@dataclass(frozen=True)
class EMConfig:
    """Schedule of the stochastic EM (radii in lattice px of the training box D)."""

    iterations: int = 60
    batch_size: int = 256
    rotations: int = 4096
    start_radius_px: float = 3.0
    end_radius_px: float = 8.0
    max_shift_px: float = 3.0
    shift_step_px: float = 1.0
    forgetting_start: float = 0.5
    forgetting_end: float = 0.05
    beta_start: float = 0.2
    beta_end: float = 1.0
    wiener: float = 0.1
    mask_fraction: float = 0.85
    classes: int = 1
    seed: int = 0


def sample_slices(channels: torch.Tensor, points_px: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a centred (C, D, D, D) grid at lattice offsets (J, n, 3) (x, y, z): (J, n, C)."""
    size = channels.shape[-1]
    grid = ((points_px + size // 2) * (2.0 / (size - 1)) - 1.0)[None, :, :, None, :]
    sampled = torch.nn.functional.grid_sample(channels[None], grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=True)
    return sampled[0, :, :, :, 0].permute(1, 2, 0)


def insert_slices(values: torch.Tensor, points_px: torch.Tensor, size: int) -> torch.Tensor:
    """Adjoint of :func:`sample_slices`: values (J, n, C) spread onto a (C, D, D, D) grid."""
    grid = torch.zeros(values.shape[-1], size, size, size, device=values.device, requires_grad=True)
    with torch.enable_grad():
        sampled = sample_slices(grid, points_px)
        (inserted,) = torch.autograd.grad(sampled, grid, values)
    return inserted


def friedel_symmetrise(grid: torch.Tensor) -> torch.Tensor:
    """``g(k) + conj(g(-k))`` for centred (C, D, D, D) grids with channels (Re, Im, weight...):
    channel 1 (Im) is odd, the others even. Returns a new tensor."""
    mirrored = torch.roll(torch.flip(grid, dims=(-3, -2, -1)), shifts=(1, 1, 1), dims=(-3, -2, -1))
    sign = torch.ones(grid.shape[0], 1, 1, 1, device=grid.device)
    sign[1] = -1.0
    return grid + sign * mirrored


def pose_scores(observed: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor, coords: torch.Tensor,
                shifts_px: torch.Tensor) -> torch.Tensor:
    """``sum_k |Y_ik(t) - c_ik P_jk|^2 - |Y_i|^2`` for every image, rotation and shift: (B, J, T).

    Args:
        observed: (B, n, 2) spectra; ctf: (B, n); slices: (J, n, 2); coords: (n, 2) cycles/px;
        shifts_px: (T, 2) or (B, T, 2) re-centring shifts.
    """
    batch = observed.shape[0]
    shifts = shifts_px.expand(batch, -1, -1) if shifts_px.dim() == 2 else shifts_px
    moved = recentre(observed, coords, shifts) * ctf[:, None, :, None]  # (B, T, n, 2)
    power = ctf.square() @ slices.square().sum(-1).T  # (B, J)
    cross = torch.einsum("btnc,jnc->bjt", moved, slices)
    return power[:, :, None] - 2.0 * cross


class StochasticEM:
    """The map, its sums and the noise level; :meth:`iterate` runs one minibatch, :meth:`best_poses` assigns."""

    def __init__(self, box_size: int, config: EMConfig, device: torch.device | str = "cpu") -> None:
        self.size, self.config, self.device = box_size, config, torch.device(device)
        self.grid_size = PADDING * box_size
        self.lattice = HalfPlaneLattice(box_size).to(self.device)
        grid = self.grid_size
        classes = config.classes
        self.sums = torch.zeros(classes, 3, grid, grid, grid, device=self.device)  # per class: Re, Im, weight
        self.volume_ft = torch.zeros(classes, grid, grid, grid, dtype=torch.complex64, device=self.device)
        self.shell = self.lattice.radius_px.round().long()  # (M,) shell of each half-plane point
        self.shell_variance: torch.Tensor | None = None  # (D // 2 + 1,) misfit variance per shell
        self.iteration = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.radius_px_3d = frequency_grid_3d(grid, device=self.device).norm(dim=-1) * box_size
        offsets = torch.arange(grid, device=self.device, dtype=torch.float32) - grid // 2
        real_radius = torch.sqrt(offsets[:, None, None] ** 2 + offsets[None, :, None] ** 2 + offsets[None, None] ** 2)
        edge = config.mask_fraction * box_size / 2
        self.mask = 0.5 * (1 + torch.cos(math.pi * ((real_radius - edge) / 3.0).clamp(0, 1)))

    # --- schedule -----------------------------------------------------------------------------------------------
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

    # --- EM -----------------------------------------------------------------------------------------------------
    def _slices(self, rotations: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lattice points (J, count, 3) of the slices and each class map's values there (K * J, count, 2): the
        hypotheses are (class, rotation) pairs, class-major."""
        points = (self.lattice.coords[:count] * self.grid_size) @ rotations[:, :2, :]
        slices = [sample_slices(torch.view_as_real(volume).permute(3, 0, 1, 2), points) for volume in self.volume_ft]
        return points, torch.cat(slices)

    @torch.no_grad()
    def iterate(self, observed: torch.Tensor, ctf: torch.Tensor) -> dict[str, float]:
        """One E and M step on a minibatch: observed (B, M, 2) spectra and ctf (B, M) at the lattice's first M
        points (M >= the current count); returns diagnostics."""
        count = self.lattice.count_within(self.radius_px())
        observed, ctf = observed[:, :count].to(self.device), ctf[:, :count].to(self.device)
        rotations = random_rotations(self.config.rotations, generator=self.generator).float().to(self.device)
        points, slices = self._slices(rotations, count)
        shifts = shift_grid(self.config.max_shift_px, self.config.shift_step_px).to(self.device)
        if self.shell_variance is None:  # start from the data's own power: a cautious (flat) posterior
            self.shell_variance = self._per_shell(observed.square().sum(-1).mean(0), count)
        sigma = self.shell_variance[self.shell[:count]].sqrt()[:, None]
        scores = pose_scores(observed / sigma, ctf, slices / sigma, self.lattice.coords[:count], shifts)  # (B, J, T)
        log_w = -self._beta() * scores
        weights = torch.softmax(log_w.reshape(len(observed), -1), dim=-1).reshape(scores.shape)
        if self.iteration == 0:  # no map yet: each image at one random rotation, unshifted
            weights = self._random_assignment(len(observed), len(slices), shifts)
        else:
            self._update_shell_variance(observed, ctf, slices, shifts, scores, count)
        self._maximise(observed, ctf, weights, points, shifts, count)
        self.iteration += 1
        return {"radius_px": float(self.lattice.radius_px[count - 1]), "beta": self._beta(),
                "max_weight_median": float(weights.flatten(1).max(1).values.median())}

    def _per_shell(self, values: torch.Tensor, count: int) -> torch.Tensor:
        """Mean of per-point values (n,) in each radius shell: (D // 2 + 1,); empty shells copy the last filled."""
        shells = self.size // 2 + 1
        total = torch.zeros(shells, device=self.device).index_add_(0, self.shell[:count], values)
        number = torch.zeros(shells, device=self.device).index_add_(0, self.shell[:count], torch.ones_like(values))
        mean = total / number.clamp_min(1)
        last = int(self.shell[count - 1])
        mean[last + 1:] = mean[last]
        return mean

    def _update_shell_variance(self, observed: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor,
                               shifts: torch.Tensor, scores: torch.Tensor, count: int) -> None:
        """Running per-shell mean squared residual of each image at its most likely pose (RELION's sigma2 noise
        spectrum, here including the model's misfit)."""
        best = scores.flatten(1).argmin(1)
        rotation, shift = best // len(shifts), shifts[best % len(shifts)]
        moved = recentre(observed, self.lattice.coords[:count], shift[:, None])[:, 0]
        residual = (moved - ctf[..., None] * slices[rotation]).square().sum(-1).mean(0)  # (n,)
        self.shell_variance = 0.5 * self.shell_variance + 0.5 * self._per_shell(residual, count)

    def _random_assignment(self, batch: int, n_rotations: int, shifts: torch.Tensor) -> torch.Tensor:
        weights = torch.zeros(batch, n_rotations, len(shifts), device=self.device)
        pick = torch.randint(0, n_rotations, (batch,), generator=self.generator).to(self.device)
        weights[torch.arange(batch, device=self.device), pick, shifts.norm(dim=-1).argmin()] = 1.0
        return weights

    def _maximise(self, observed: torch.Tensor, ctf: torch.Tensor, weights: torch.Tensor, points: torch.Tensor,
                  shifts: torch.Tensor, count: int) -> None:
        coords = self.lattice.coords[:count]
        moved = recentre(observed, coords, shifts.expand(len(observed), -1, -1)) * ctf[:, None, :, None]
        sums = torch.einsum("bjt,btnc->jnc", weights, moved)  # (K * J, n, 2)
        weight = weights.sum(-1).T @ ctf.square()  # (K * J, n)
        values = torch.cat((sums, weight[..., None]), -1).reshape(self.config.classes, len(points), count, 3)
        self.sums.mul_(1.0 - self._forgetting())
        for k in range(self.config.classes):
            self.sums[k].add_(friedel_symmetrise(insert_slices(values[k], points, self.grid_size)))
        self._update_map(count)

    def _update_map(self, count: int) -> None:
        radius = float(self.lattice.radius_px[count - 1])
        inside = self.radius_px_3d <= radius + 1.0
        for k, sums in enumerate(self.sums):
            regulariser = self.config.wiener * sums[2][inside].mean().clamp_min(1e-12)
            volume_ft = torch.complex(sums[0], sums[1]) / (sums[2] + regulariser)
            volume = ifft3_centered(volume_ft * inside).real * self.mask
            self.volume_ft[k] = (fft3_centered(volume) * inside).to(torch.complex64)

    # --- assignment ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def best_poses(self, observed: torch.Tensor, ctf: torch.Tensor, n_rotations: int = 8192,
                   local_rounds: int = 4, local_candidates: int = 48
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Most likely pose of each image at the final radius: a global search over ``n_rotations`` random
        rotations and the shift grid, then ``local_rounds`` of local search (random perturbations of the best
        rotation, halving in angle each round, and a shift grid of half the step around the best shift).

        Returns rotations (B, 3, 3), shifts (B, 2) px and classes (B,).
        """
        count = self.lattice.count_within(self.config.end_radius_px)
        observed, ctf = observed[:, :count].to(self.device), ctf[:, :count].to(self.device)
        coords = self.lattice.coords[:count]
        rotations = random_rotations(n_rotations, generator=self.generator).float().to(self.device)
        shifts = shift_grid(self.config.max_shift_px, self.config.shift_step_px).to(self.device)
        scores = pose_scores(observed, ctf, self._slices(rotations, count)[1], coords, shifts)
        best = scores.flatten(1).argmin(1)
        hypothesis = best // len(shifts)
        classes = hypothesis // n_rotations
        best_r, best_t = rotations[hypothesis % n_rotations], shifts[best % len(shifts)]
        angle_deg = (8 * math.pi**2 / n_rotations) ** (1 / 3) * 180 / math.pi
        step = self.config.shift_step_px
        for _ in range(local_rounds):
            for k in range(self.config.classes):
                mine = classes == k
                if mine.any():
                    best_r[mine], best_t[mine] = self._local_search(
                        self.volume_ft[k], observed[mine], ctf[mine], coords, best_r[mine], best_t[mine], angle_deg,
                        step, local_candidates)
            angle_deg, step = angle_deg / 2, step / 2
        return best_r, best_t, classes

    def _local_search(self, volume_ft: torch.Tensor, observed: torch.Tensor, ctf: torch.Tensor, coords: torch.Tensor,
                      rotations: torch.Tensor, shifts: torch.Tensor, angle_deg: float, step_px: float, candidates: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = len(observed)
        axis_angle = torch.randn(batch, candidates, 3, generator=self.generator).to(self.device)
        axis_angle *= math.radians(angle_deg) / math.sqrt(3)
        axis_angle[:, 0] = 0.0  # keep the current best
        trial = axis_angle_to_matrix(axis_angle) @ rotations[:, None]  # (B, K, 3, 3)
        offsets = torch.tensor([[0.0, 0.0], [1, 0], [-1, 0], [0, 1], [0, -1]], device=self.device) * step_px
        trial_shifts = shifts[:, None] + offsets  # (B, S, 2)
        points = (coords * self.grid_size) @ trial[..., :2, :].reshape(-1, 2, 3)
        channels = torch.view_as_real(volume_ft).permute(3, 0, 1, 2)
        slices = sample_slices(channels, points).reshape(batch, candidates, -1, 2)
        moved = recentre(observed, coords, trial_shifts) * ctf[:, None, :, None]  # (B, S, n, 2)
        power = (slices.square().sum(-1) * ctf[:, None].square()).sum(-1)  # (B, K)
        cross = torch.einsum("bsnc,bknc->bks", moved, slices)
        scores = (power[:, :, None] - 2 * cross).flatten(1)
        best = scores.argmin(1)
        index = torch.arange(batch, device=self.device)
        return trial[index, best // len(offsets)], trial_shifts[index, best % len(offsets)]


# --- the experiment's driver ---------------------------------------------------------------------------------------
def load_spectra(star: str, n_images: int, radius_px: float) -> dict:
    """First ``n_images`` of a preprocessed star file: windowed spectra, CTF at the half-plane points, true poses."""
    from cryofire.io import read_star
    from cryofire.model.image_formation import observed_spectrum
    from cryofire.physics import soft_circular_window
    from cryofire.train.data import ParticleImages, ctf_from_parameters

    data = ParticleImages(read_star(star))
    size = data.image_size
    batch = data.__getitems__(list(range(min(n_images, len(data)))))
    lattice = HalfPlaneLattice(size)
    count = lattice.count_within(radius_px)
    window = soft_circular_window(size, 0.85, 0.99).float()  # the model's default window
    return {"size": size, "observed": observed_spectrum(batch["images"] * window, lattice, count),
            "ctf": lattice.gather(ctf_from_parameters(batch["ctf_parameters"], size), count),
            "rotations": batch["rotations"], "shifts_px": batch["origins_px"]}


def median_error_deg(em: StochasticEM, data: dict, n_images: int) -> float:
    """Median rotation error (deg, after global alignment, both hands) of the best poses of the first images."""
    import numpy as np

    from cryofire.evaluate import align_poses, rotation_errors_deg

    rotations, _, _ = em.best_poses(data["observed"][:n_images], data["ctf"][:n_images], local_rounds=3)
    pred, true = rotations.double().numpy(), data["rotations"][:n_images].double().numpy()
    return float(np.median(rotation_errors_deg(align_poses(pred, true).apply(pred), true)))


def identifiability(star: str) -> None:
    data = load_spectra(star, 5000, 14)
    size = data["size"]
    for radius in (3, 4, 6, 8, 11, 14):
        em = StochasticEM(size, EMConfig(end_radius_px=radius))
        count = em.lattice.count_within(radius)
        coords = em.lattice.coords[:count]
        observed, ctf = data["observed"][:, :count], data["ctf"][:, :count]
        moved = recentre(observed, coords, data["shifts_px"][:, None])[:, 0] * ctf[..., None]
        points = (coords * em.grid_size) @ data["rotations"][:, :2, :]
        em.sums[0] = friedel_symmetrise(insert_slices(torch.cat((moved, ctf.square()[..., None]), -1), points,
                                                   em.grid_size))
        em._update_map(count)
        print(f"radius {radius} px ({count} points): median rotation error {median_error_deg(em, data, 400):.1f} deg",
              flush=True)


def run_em(star: str, config: EMConfig) -> None:
    data = load_spectra(star, 10_000, max(config.start_radius_px, config.end_radius_px))
    em = StochasticEM(data["size"], config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    for iteration in range(config.iterations):
        rows = torch.randint(0, len(data["observed"]), (config.batch_size,), generator=generator)
        info = em.iterate(data["observed"][rows], data["ctf"][rows])
        if iteration % 10 == 9 or iteration == config.iterations - 1:
            print(iteration + 1, {k: round(v, 3) for k, v in info.items()},
                  f"median rotation error {median_error_deg(em, data, 500):.1f} deg", flush=True)


def main() -> None:
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("identifiability", "em"))
    parser.add_argument("--star", required=True, help="preprocessed particles with true poses (simulated)")
    for field in dataclasses.fields(EMConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    if args.what == "identifiability":
        identifiability(args.star)
    else:
        run_em(args.star, EMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EMConfig)}))


if __name__ == "__main__":
    main()
