"""Preprocessing: Fourier-crop downsampling, normalisation and contrast inversion, streamed in chunks.

Memory stays at one chunk of images whatever the dataset size; output stacks are written atomically and a killed
run resumes from the last complete stack. CTF and all other metadata are carried into the new star file, with the
pixel size rescaled to the new box.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofire import physics
from cryofire.errors import ConfigError, InputError
from cryofire.io import ImageSource, read_particles, write_star
from cryofire.stacks import write_stacks

NORMALISATIONS = ("background", "dataset", "none")
_DATASET_STATS_IMAGES = 5_000


@dataclass
class PreprocessConfig:
    """Settings of `cryofire preprocess`.

    Attributes:
        box_size: output box D in pixels (even, at most the input box); None keeps the input box.
        normalize: "background": per image, subtract the mean and divide by the standard deviation of the pixels
            outside a circle of `mask_radius_fraction` x D/2 (RELION's convention); "dataset": one mean and
            standard deviation for the whole dataset (from up to 5,000 images); "none".
        mask_radius_fraction: radius of the particle circle as a fraction of half the box.
        invert: multiply images by -1 (for stacks with dark particles on a bright background).
    """

    box_size: int | None = None
    normalize: str = "background"
    mask_radius_fraction: float = 0.85
    invert: bool = False
    images_per_stack: int = 50_000
    chunk_size: int = 1_000

    def __post_init__(self) -> None:
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALISATIONS)}, not {self.normalize!r}")
        if self.box_size is not None and (self.box_size < 8 or self.box_size % 2):
            raise ConfigError(f"--box must be an even number of pixels >= 8, not {self.box_size}")
        if not 0.1 <= self.mask_radius_fraction <= 1.0:
            raise ConfigError("--mask-radius must lie between 0.1 and 1.0 (fraction of half the box)")


class ChunkTransform:
    """Downsample, invert and normalise a chunk of images (numpy (B, D, D) -> numpy (B, d, d))."""

    def __init__(self, config: PreprocessConfig, input_size: int, source_path: str) -> None:
        self.config = config
        self.output_size = config.box_size or input_size
        if self.output_size > input_size:
            raise ConfigError(f"--box {self.output_size} is larger than the input box {input_size}; only downsampling")
        radius = config.mask_radius_fraction * self.output_size / 2
        self.background = ~physics.real_space_disk_mask(self.output_size, radius)
        self.source_path = source_path
        self.dataset_stats: tuple[float, float] | None = None

    def resample(self, images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if self.output_size != tensor.shape[-1]:
            tensor = physics.downsample_images(tensor, self.output_size)
        return -tensor if self.config.invert else tensor

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        tensor = self.resample(images)
        if self.config.normalize == "background":
            ring = tensor[:, self.background]
            mean, std = ring.mean(dim=1), ring.std(dim=1)
            self._check_variance(std, indices)
            tensor = (tensor - mean[:, None, None]) / std[:, None, None]
        elif self.config.normalize == "dataset":
            mean, std = self.dataset_stats
            tensor = (tensor - mean) / std
        return tensor.numpy()

    def _check_variance(self, std: torch.Tensor, indices: np.ndarray) -> None:
        flat = torch.nonzero(std <= 0).flatten()
        if len(flat):
            rows = ", ".join(str(int(indices[i]) + 1) for i in flat[:5])
            raise InputError(
                self.source_path,
                f"{len(flat)} image(s) have a constant background (zero variance), e.g. particle row(s) {rows}",
                "remove them from the star file or use --normalize dataset",
            )


def dataset_statistics(source: ImageSource, transform: ChunkTransform, chunk_size: int) -> tuple[float, float]:
    """Mean and standard deviation of the resampled pixels of (up to) the first 5,000 images."""
    count = min(len(source), _DATASET_STATS_IMAGES)
    total, total_sq, n_pixels = 0.0, 0.0, 0
    for start in range(0, count, chunk_size):
        chunk = transform.resample(source[np.arange(start, min(start + chunk_size, count))]).double()
        total, total_sq, n_pixels = total + chunk.sum().item(), total_sq + (chunk**2).sum().item(), n_pixels + chunk.numel()
    mean = total / n_pixels
    std = float(np.sqrt(max(total_sq / n_pixels - mean**2, 0.0)))
    if std == 0.0:
        raise InputError(transform.source_path, "all images are constant (zero variance)")
    return mean, std


def preprocess(
    particles_path: str | Path,
    out_dir: str | Path,
    config: PreprocessConfig,
    datadir: str | Path | None = None,
    allow_absolute_paths: bool = False,
) -> Path:
    """Preprocess a star/cs dataset into `out_dir/particles.star` + `out_dir/stacks/`; returns the star path."""
    out_dir = Path(out_dir)
    table = read_particles(particles_path, datadir=datadir, allow_absolute_paths=allow_absolute_paths)
    source = ImageSource(table)
    transform = ChunkTransform(config, source.image_size, str(particles_path))
    if config.normalize == "dataset":
        transform.dataset_stats = dataset_statistics(source, transform, config.chunk_size)
    fingerprint = {
        "input": str(Path(particles_path).resolve()),
        "input_mtime_ns": Path(particles_path).stat().st_mtime_ns,
        "config": asdict(config),
    }
    scale = source.image_size / transform.output_size
    pixel_size = float(table["rlnImagePixelSize"].iloc[0]) * scale
    paths, within = write_stacks(
        out_dir / "stacks", "particles", len(source), transform.output_size, pixel_size,
        lambda indices: transform(source[indices], indices), fingerprint,
        config.images_per_stack, config.chunk_size, "preprocessing",
    )
    write_star(out_dir / "particles.star", _output_table(table, paths, within, scale, transform.output_size))
    return out_dir / "particles.star"


def _output_table(table: pd.DataFrame, paths: np.ndarray, within: np.ndarray, scale: float, size: int) -> pd.DataFrame:
    out = table.copy()
    out["image_path"], out["image_index"] = paths.astype(str), within
    out["rlnImagePixelSize"] = table["rlnImagePixelSize"] * scale
    out["rlnImageSize"] = size
    return out
