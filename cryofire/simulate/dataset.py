"""Simulated cryo-EM datasets with ground truth: poses, CTF, shifts, noise and heterogeneity.

Image formation: the projection of the particle's density at a uniformly random RELION pose, displaced by minus
the origin, multiplied by the CTF in Fourier space, plus white Gaussian noise. The SNR is the ratio of the
variance of the noise-free (CTF-modulated) images over the whole box to the noise variance, measured on the
first images of the dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofire import physics
from cryofire.errors import ConfigError
from cryofire.io import read_volume, write_star, write_volume
from cryofire.simulate.phantom import build_phantom, conformations
from cryofire.simulate.render import atom_sigma_px, render_projections, render_volume
from cryofire.stacks import write_stacks

DEFAULT_BOX_ANGSTROM = 160.0
_SNR_PILOT_IMAGES = 256


@dataclass
class SimulationConfig:
    """Settings of a simulated dataset (units in the names)."""

    n_images: int = 1000
    box_size: int = 64
    pixel_size_angstrom: float | None = None  # default: DEFAULT_BOX_ANGSTROM / box_size
    snr: float = 0.1
    defocus_min_um: float = 1.0
    defocus_max_um: float = 2.5
    astigmatism_angstrom: float = 200.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    shift_std_px: float = 2.0
    heterogeneity: str = "bimodal"  # "bimodal" | "continuous" (phantom only)
    state_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    hinge_range_deg: tuple[float, float] = (0.0, 35.0)
    atom_sigma_angstrom: float | None = None  # default: max(2 Å, 1 px)
    volumes: list[str] = field(default_factory=list)  # .mrc states instead of the phantom
    seed: int = 0
    images_per_stack: int = 10_000
    chunk_size: int = 500

    def __post_init__(self) -> None:
        if self.pixel_size_angstrom is None:
            self.pixel_size_angstrom = DEFAULT_BOX_ANGSTROM / self.box_size
        checks = {
            "n_images": self.n_images >= 1,
            "box_size": self.box_size >= 8 and self.box_size % 2 == 0,
            "pixel_size_angstrom": self.pixel_size_angstrom > 0,
            "snr": self.snr > 0,
            "defocus_max_um": self.defocus_max_um >= self.defocus_min_um > 0,
            "heterogeneity": self.heterogeneity in ("bimodal", "continuous"),
            "state_weights": all(w >= 0 for w in self.state_weights) and sum(self.state_weights) > 0
            and (bool(self.volumes) or self.heterogeneity != "bimodal"
                 or len(self.state_weights) <= len(self.hinge_range_deg)),  # the phantom has two states
            "shift_std_px": self.shift_std_px >= 0,
            "images_per_stack": self.images_per_stack >= 1,
            "chunk_size": self.chunk_size >= 1,
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid simulation setting(s): {', '.join(bad)} (see `cryofire simulate --help`)")

    @property
    def n_states(self) -> int:
        return len(self.volumes) if self.volumes else len(self.state_weights)


def draw_metadata(config: SimulationConfig) -> pd.DataFrame:
    """Per-image ground truth: poses, origins, CTF and conformation, as RELION columns."""
    rng = np.random.default_rng(config.seed)
    n = config.n_images
    table = pd.DataFrame(
        {
            "rlnAngleRot": rng.uniform(-180.0, 180.0, n),
            "rlnAngleTilt": np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n))),
            "rlnAnglePsi": rng.uniform(-180.0, 180.0, n),
        }
    )
    origin_px = np.clip(rng.normal(0.0, config.shift_std_px, (n, 2)), -3 * config.shift_std_px, 3 * config.shift_std_px)
    table["rlnOriginXAngst"] = origin_px[:, 0] * config.pixel_size_angstrom
    table["rlnOriginYAngst"] = origin_px[:, 1] * config.pixel_size_angstrom
    defocus_u = rng.uniform(config.defocus_min_um, config.defocus_max_um, n) * 1e4
    table["rlnDefocusU"] = defocus_u
    table["rlnDefocusV"] = defocus_u - rng.uniform(0.0, config.astigmatism_angstrom, n)
    table["rlnDefocusAngle"] = rng.uniform(-180.0, 180.0, n)
    for column, value in _optics_columns(config).items():
        table[column] = value
    _draw_conformations(config, rng, table)
    return table


def _optics_columns(config: SimulationConfig) -> dict:
    return {
        "rlnVoltage": config.voltage_kv,
        "rlnSphericalAberration": config.cs_mm,
        "rlnAmplitudeContrast": config.amplitude_contrast,
        "rlnPhaseShift": 0.0,
        "rlnCtfBfactor": 0.0,
        "rlnImagePixelSize": config.pixel_size_angstrom,
        "rlnImageSize": config.box_size,
        "rlnOpticsGroup": 1,
    }


def _draw_conformations(config: SimulationConfig, rng: np.random.Generator, table: pd.DataFrame) -> None:
    """Adds the true state (`rlnClassNumber`, 1-based) or hinge angle (`hinge_deg`) of each image."""
    n = config.n_images
    if config.volumes or config.heterogeneity == "bimodal":
        weights = np.asarray(config.state_weights[: config.n_states], float)
        if len(weights) != config.n_states:
            raise ConfigError(f"--state-weights needs one weight per state ({config.n_states})")
        table["rlnClassNumber"] = rng.choice(config.n_states, size=n, p=weights / weights.sum()) + 1
        if not config.volumes:
            table["hinge_deg"] = np.asarray(config.hinge_range_deg)[table["rlnClassNumber"].to_numpy() - 1]
    else:
        table["hinge_deg"] = rng.uniform(*config.hinge_range_deg, n)


class ImageModel:
    """Renders the noise-free, CTF-modulated images of a metadata table (phantom or .mrc states)."""

    def __init__(self, config: SimulationConfig, table: pd.DataFrame) -> None:
        self.config = config
        self.table = table
        self.size = config.box_size
        self.sigma_px = atom_sigma_px(config.pixel_size_angstrom, config.atom_sigma_angstrom)
        self.phantom = None if config.volumes else build_phantom()
        self.volumes = [self._load_volume(path) for path in config.volumes]
        self._half_freqs: torch.Tensor | None = None

    def _load_volume(self, path: str) -> torch.Tensor:
        volume, _ = read_volume(path)
        if volume.shape[0] != self.size:
            raise ConfigError(f"{path}: box {volume.shape[0]} differs from --box {self.size}")
        return torch.from_numpy(volume)

    def true_volume(self, state: int | None = None, hinge_deg: float | None = None) -> torch.Tensor:
        """(D, D, D) density of a state (0-based) or hinge angle."""
        if self.phantom is None:
            return self.volumes[state]
        angle = hinge_deg if hinge_deg is not None else self.config.hinge_range_deg[state]
        atoms = torch.from_numpy(conformations(self.phantom, np.array([angle]))[0])
        weights = torch.from_numpy(self.phantom.weights)
        return render_volume(atoms, weights, self.size, self.config.pixel_size_angstrom, self.sigma_px).float()

    def clean_images(self, indices: np.ndarray) -> torch.Tensor:
        """Noise-free images (B, D, D) float32 of the given rows, CTF applied."""
        rows = self.table.iloc[indices]
        rotations = physics.euler_to_matrix(*(torch.tensor(rows[c].to_numpy()) for c in _ANGLES))
        shift_px = -torch.tensor(rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / self.config.pixel_size_angstrom
        projections = self._project(rows, rotations, shift_px)
        # The CTF is computed in float64 (double precision at high frequencies and large defocus).
        ctf = physics.compute_ctf(
            self._half_spectrum_frequencies,
            defocus_u_angstrom=torch.tensor(rows["rlnDefocusU"].to_numpy()),
            defocus_v_angstrom=torch.tensor(rows["rlnDefocusV"].to_numpy()),
            defocus_angle_deg=torch.tensor(rows["rlnDefocusAngle"].to_numpy()),
            voltage_kv=self.config.voltage_kv,
            cs_mm=self.config.cs_mm,
            amplitude_contrast=self.config.amplitude_contrast,
        )
        # Multiplying by a real filter commutes with the centring shifts, and the CTF is point-symmetric
        # (CTF(k) = CTF(-k)), so the uncentred half spectrum of rfft2 gives the same images as
        # IFT_centred(CTF * FT_centred(projection)).real (up to the unpaired Nyquist row) at half the cost.
        spectra = torch.fft.rfft2(projections.float())
        return torch.fft.irfft2(spectra * ctf.float(), s=(self.size, self.size))

    @property
    def _half_spectrum_frequencies(self) -> torch.Tensor:
        """(D, D // 2 + 1, 2) frequencies (kx, ky) in 1/Å of the uncentred `torch.fft.rfft2` layout, float64."""
        if self._half_freqs is None:
            ky = torch.fft.fftfreq(self.size, dtype=torch.float64)
            kx = torch.fft.rfftfreq(self.size, dtype=torch.float64)
            grid_y, grid_x = torch.meshgrid(ky, kx, indexing="ij")
            self._half_freqs = torch.stack((grid_x, grid_y), dim=-1) / self.config.pixel_size_angstrom
        return self._half_freqs

    def _project(self, rows: pd.DataFrame, rotations: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
        if self.phantom is None:
            states = rows["rlnClassNumber"].to_numpy() - 1
            images = torch.empty(len(rows), self.size, self.size, dtype=torch.float64)
            for state in np.unique(states):
                pick = torch.from_numpy(np.flatnonzero(states == state))
                projected = physics.project_volume(self.volumes[state].double(), rotations[pick])
                images[pick] = physics.shift_images(projected, shift_px[pick])
            return images
        # float32 is ample here (positions within +-D px, images written as float32) and twice as fast.
        atoms = torch.from_numpy(conformations(self.phantom, rows["hinge_deg"].to_numpy())).float()
        weights = torch.from_numpy(self.phantom.weights).float()
        return render_projections(
            atoms, weights, rotations.float(), self.size, self.config.pixel_size_angstrom, self.sigma_px,
            shift_px.float(),
        )


_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def noise_std_for_snr(model: ImageModel, snr: float) -> float:
    """Noise standard deviation giving `snr`, from the variance of the first clean images."""
    pilot = np.arange(min(_SNR_PILOT_IMAGES, len(model.table)))
    return float(model.clean_images(pilot).var().sqrt() / np.sqrt(snr))


def simulate_dataset(config: SimulationConfig, out_dir: str | Path) -> Path:
    """Write a simulated dataset to `out_dir`; returns the path of its `particles.star`.

    Writes `particles.star` (RELION 3.1 with true poses, origins, CTF and `rlnClassNumber` for discrete states),
    `stacks/particles_NNNN.mrcs`, the true volumes under `volumes/` (with `average.mrc`, the population average), `true_latents.npy` (N, 1) (hinge angle in
    degrees, or the 0-based state for .mrc inputs) and `truth.json` (settings and noise level).
    """
    out_dir = Path(out_dir)
    table = draw_metadata(config)
    model = ImageModel(config, table)
    noise_std = noise_std_for_snr(model, config.snr)

    def make_images(indices: np.ndarray) -> np.ndarray:
        noise_rng = np.random.default_rng([config.seed, int(indices[0])])
        images = model.clean_images(indices).numpy()
        noise = noise_rng.standard_normal(images.shape, dtype=np.float32)
        noise *= np.float32(noise_std)
        images += noise
        return images

    fingerprint = {"config": asdict(config), "noise_std": noise_std}
    paths, within = write_stacks(
        out_dir / "stacks", "particles", config.n_images, config.box_size, config.pixel_size_angstrom,
        make_images, fingerprint, config.images_per_stack, config.chunk_size, "simulating",
    )
    table["image_path"], table["image_index"] = paths.astype(str), within
    table["rlnImageName"] = [f"{i + 1:06d}@{p}" for i, p in zip(within, paths)]
    _write_truth(config, model, table, noise_std, out_dir)
    star_path = out_dir / "particles.star"
    write_star(star_path, table.drop(columns=["hinge_deg"], errors="ignore"))
    return star_path


def _write_truth(
    config: SimulationConfig, model: ImageModel, table: pd.DataFrame, noise_std: float, out_dir: Path
) -> None:
    """True volumes (each state, or points along the hinge, and the population average), latents, truth.json."""
    volume_dir = out_dir / "volumes"
    volume_dir.mkdir(parents=True, exist_ok=True)
    pixel_size = config.pixel_size_angstrom
    names = []
    if config.volumes or config.heterogeneity == "bimodal":
        counts = np.bincount(table["rlnClassNumber"].to_numpy() - 1, minlength=config.n_states)
        average = 0.0
        for state in range(config.n_states):
            volume = model.true_volume(state=state)
            average = average + volume * (counts[state] / counts.sum())
            names.append(f"state_{state + 1}.mrc")
            write_volume(volume_dir / names[-1], volume.numpy(), pixel_size)
        latents = table["rlnClassNumber"].to_numpy() - 1.0 if config.volumes else table["hinge_deg"].to_numpy()
    else:
        for angle in np.linspace(*config.hinge_range_deg, 5):
            names.append(f"hinge_{angle:05.1f}deg.mrc")
            write_volume(volume_dir / names[-1], model.true_volume(hinge_deg=angle).numpy(), pixel_size)
        angles = np.linspace(*config.hinge_range_deg, 21)
        average = sum(model.true_volume(hinge_deg=a) for a in angles) / len(angles)
        latents = table["hinge_deg"].to_numpy()
    write_volume(volume_dir / "average.mrc", average.numpy(), pixel_size)
    tmp = out_dir / "true_latents.tmp.npy"
    np.save(tmp, latents.astype(np.float32)[:, None])
    os.replace(tmp, out_dir / "true_latents.npy")
    truth = {"config": asdict(config), "noise_std": noise_std, "volumes": names, "average_volume": "average.mrc"}
    (out_dir / "truth.json.tmp").write_text(json.dumps(truth, indent=1))
    os.replace(out_dir / "truth.json.tmp", out_dir / "truth.json")
