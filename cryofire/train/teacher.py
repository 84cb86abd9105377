"""The teachers of the first training phase: pose (and class) targets while fewer than `search_fraction` of the
planned images have been seen.

:class:`PoseTeacher` (``--teacher search``, :mod:`cryofire.model.pose_search`): every `search_every_images` images all
training images are scored against the current consensus map; the best poses are the targets until the next search.
:class:`EMTeacher` (``--teacher em``, :mod:`cryofire.model.ab_initio`): a classical ab initio run once before the first
step gives poses and classes, and (``simulated_batch_size``) class maps to simulate fresh training images from
(:mod:`cryofire.model.map_images`). The targets are part of the checkpoint (the maps are rebuilt from them), so a
resumed run continues exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from cryofire.model import CryoFireModel, frequency_radius_px
from cryofire.model.ab_initio import initial_poses
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.image_formation import observed_spectrum
from cryofire.model.map_images import MapImageSimulator, simulator_from_assignment
from cryofire.model.pose_search import (
    best_poses,
    consensus_volume_ft,
    projection_table,
    search_rotations,
    shift_grid,
)
from cryofire.train.data import ParticleImages, ctf_from_parameters, make_loader


class PoseTeacher:
    """Search schedule and the current target pose of every table row."""

    def __init__(self, n_rows: int, planned_images: int, search_fraction: float, search_every_images: int,
                 n_rotations: int, max_radius_px: float, seed: int) -> None:
        self.end_images = int(search_fraction * planned_images)
        self.every = max(search_every_images, 1)
        self.n_rotations, self.max_radius_px, self.seed = n_rotations, max_radius_px, seed
        self.rotations = torch.eye(3).repeat(n_rows, 1, 1)
        self.shifts_px = torch.zeros(n_rows, 2)
        self.round = -1

    def active(self, images_seen: int) -> bool:
        return images_seen < self.end_images

    def due(self, images_seen: int) -> bool:
        return self.active(images_seen) and images_seen // self.every != self.round

    def targets(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"target_rotations": self.rotations[rows].to(device), "target_shifts_px": self.shifts_px[rows].to(device)}

    @torch.no_grad()
    def search(self, model: CryoFireModel, dataset: ParticleImages, images_seen: int, device: torch.device,
               batch_size: int, num_workers: int) -> dict[str, float]:
        """Score every image of `dataset` against the current map; update the targets of its rows."""
        started = time.time()
        self.round = images_seen // self.every
        radius_px = min(frequency_radius_px(images_seen, model.config.box_size, model.schedule), self.max_radius_px)
        count = model.lattice.count_within(radius_px)
        coords = model.lattice.coords[:count]
        volume_ft = consensus_volume_ft(model.decoder, model.config.zdim, radius_px)
        rotations = search_rotations(self.n_rotations, self.seed * 1_000_003 + self.round, device)
        projections = projection_table(volume_ft, rotations, model.lattice, count)
        shifts = shift_grid(model.config.max_shift_fraction * model.config.box_size).to(device)
        loader = make_loader(dataset, batch_size, False, self.seed, 0, num_workers, device.type == "cuda")
        for batch in loader:
            observed, ctf = _batch_spectra(model, batch, count, device)
            index, shift, _ = best_poses(observed, ctf, coords, projections, shifts)
            self.rotations[batch["index"]] = rotations[index].cpu()
            self.shifts_px[batch["index"]] = shift.cpu()
        return {"search_seconds": time.time() - started, "search_radius_px": radius_px}

    def state(self) -> dict:
        return {"rotations": self.rotations, "shifts_px": self.shifts_px, "round": self.round}

    def load_state(self, state: dict) -> None:
        self.rotations, self.shifts_px, self.round = state["rotations"], state["shifts_px"], int(state["round"])


class EMTeacher(PoseTeacher):
    """Targets from the classical ab initio of :mod:`cryofire.model.ab_initio` (stochastic EM, then refinement),
    computed once before the first step, for the training images (at most ``max_images`` of them take part in the
    EM and refinement; the others are assigned against the final class maps)."""

    def __init__(self, n_rows: int, planned_images: int, fraction: float, config: EMConfig,
                 max_images: int = 20_000) -> None:
        super().__init__(n_rows, planned_images, fraction, 1, 0, 0.0, config.seed)
        self.config, self.max_images = config, max_images
        self.classes = torch.zeros(n_rows, dtype=torch.long)
        self._simulator: MapImageSimulator | None = None

    def due(self, images_seen: int) -> bool:
        return self.active(images_seen) and self.round < 0

    @torch.no_grad()
    def search(self, model: CryoFireModel, dataset: ParticleImages, images_seen: int, device: torch.device,
               batch_size: int, num_workers: int) -> dict[str, float]:
        started = time.time()
        size = model.config.box_size
        count = model.lattice.count_within(size / 2)
        chosen = self._chosen(dataset)
        observed, ctf, _ = _spectra(model, ParticleImages(dataset.table, dataset.rows[chosen]), count, device,
                                    batch_size, num_workers)
        with _full_float32():
            em, rotations, shifts, classes = initial_poses(observed, ctf, size, self.config, device, _log_progress)
            rows = torch.from_numpy(dataset.rows[chosen])
            self._store(rows, rotations, shifts, classes)
            rest = np.setdiff1d(np.arange(len(dataset)), chosen)
            if len(rest):
                loader = make_loader(ParticleImages(dataset.table, dataset.rows[rest]), batch_size, False, 0, 0,
                                     num_workers, device.type == "cuda")
                for batch in loader:
                    spectra, weights = _batch_spectra(model, batch, count, device)
                    rotations, shifts, classes, _ = em.assign(spectra, weights, size / 2)
                    self._store(batch["index"], rotations, shifts, classes)
        self.round = 0
        sizes = torch.bincount(self.classes[torch.from_numpy(dataset.rows)], minlength=self.config.classes)
        return {"search_seconds": time.time() - started, "search_radius_px": size / 2,
                "em_class_sizes": sizes.tolist()}

    def _chosen(self, dataset: ParticleImages) -> np.ndarray:
        """Positions (sorted) of the at most ``max_images`` dataset images the ab initio runs on."""
        generator = np.random.default_rng(self.config.seed)
        return np.sort(generator.permutation(len(dataset))[: self.max_images])

    def targets(self, rows: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        classes = torch.nn.functional.one_hot(self.classes[rows], self.config.classes)
        return {**super().targets(rows, device), "target_classes": classes.to(device)}

    @torch.no_grad()
    def simulated(self, count: int, generator: torch.Generator, model: CryoFireModel, dataset: ParticleImages,
                  device: torch.device, batch_size: int, num_workers: int, noise_scale: float = 1.0
                  ) -> dict[str, torch.Tensor]:
        """``count`` images simulated from the class maps of the teacher's assignment, with their poses and
        one-hot classes as targets (the ``simulated`` argument of the model), their noise ``noise_scale`` times the
        data's in amplitude. The maps are rebuilt from the stored poses on first use (after a resume too)."""
        if self._simulator is None:
            with _full_float32():
                self._simulator = self._build_simulator(model, dataset, device, batch_size, num_workers)
        drawn = self._simulator.draw(count, generator, noise_scale)
        classes = torch.nn.functional.one_hot(drawn.classes, self.config.classes)
        return {"images": drawn.images, "target_rotations": drawn.rotations, "target_shifts_px": drawn.shifts_px,
                "target_classes": classes}

    def _build_simulator(self, model: CryoFireModel, dataset: ParticleImages, device: torch.device, batch_size: int,
                         num_workers: int) -> MapImageSimulator:
        size = model.config.box_size
        positions = self._chosen(dataset)
        observed, ctf, ctf_parameters = _spectra(model, ParticleImages(dataset.table, dataset.rows[positions]),
                                                 model.lattice.count_within(size / 2), device, batch_size,
                                                 num_workers)
        rows = torch.from_numpy(dataset.rows[positions])
        em = StochasticEM(size, 0, self.config, device)
        return simulator_from_assignment(em, observed, ctf, self.rotations[rows].to(device),
                                         self.shifts_px[rows].to(device), self.classes[rows].to(device),
                                         ctf_parameters, float(model.window.square().mean()))

    def _store(self, rows: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor, classes: torch.Tensor
               ) -> None:
        self.rotations[rows], self.shifts_px[rows], self.classes[rows] = rotations.cpu(), shifts.cpu(), classes.cpu()

    def state(self) -> dict:
        return {**super().state(), "classes": self.classes}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.classes = state["classes"]


@contextmanager
def _full_float32() -> Iterator[None]:
    """Float32 matrix products without TF32 (which training enables on CUDA): the EM's scores are differences of
    sums over thousands of points, beyond TF32's 10-bit mantissa."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _batch_spectra(model: CryoFireModel, batch: dict, count: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed spectra (B, count, 2) and CTF (B, count) of a batch at the model's first half-plane points."""
    images = batch["images"].to(device) * model.window
    ctf = ctf_from_parameters(batch["ctf_parameters"].to(device), images.shape[-1])
    return observed_spectrum(images, model.lattice, count), model.lattice.gather(ctf, count)


def _spectra(model: CryoFireModel, dataset: ParticleImages, count: int, device: torch.device, batch_size: int,
             num_workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectra (N, count, 2), CTF values (N, count) and CTF parameter rows (N, 9) of a dataset, on ``device``."""
    loader = make_loader(dataset, batch_size, False, 0, 0, num_workers, device.type == "cuda")
    spectra, ctf, parameters = [], [], []
    for batch in loader:
        values, weights = _batch_spectra(model, batch, count, device)
        spectra.append(values)
        ctf.append(weights)
        parameters.append(batch["ctf_parameters"].to(device))
    return torch.cat(spectra), torch.cat(ctf), torch.cat(parameters)


def _log_progress(stage: str, info: dict, poses: tuple | None) -> None:
    logging.getLogger(__name__).info("EM initialisation, %s: %s", stage,
                                     ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in info.items()))


def target_rotation_error(teacher: PoseTeacher, true_rotations: torch.Tensor, rows: np.ndarray) -> float:
    """Median rotation error (deg, after alignment) of the current search targets: a diagnostic on simulated data."""
    from cryofire.evaluate import align_poses, rotation_errors_deg

    pred = teacher.rotations[rows].double().numpy()
    truth = true_rotations[rows].double().numpy()
    return float(np.median(rotation_errors_deg(align_poses(pred, truth).apply(pred), truth)))
