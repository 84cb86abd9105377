"""Preprocessing: Fourier-crop downsampling, normalisation and contrast inversion, streamed in chunks.

Memory stays at one chunk of images whatever the dataset size; output stacks are written atomically and a killed
run resumes from the last complete stack. CTF and all other metadata are carried into the new star file, with the
pixel size rescaled to the new box.
"""

from __future__ import annotations

import logging
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
# A background whose standard deviation is below this fraction of its |mean| is constant up to float32 rounding
# (Fourier cropping a constant image leaves ~1e-7 relative noise, which normalising would blow up to unit variance).
_CONSTANT_RELATIVE_STD = 1e-5
_LISTED_ROWS = 10
_log = logging.getLogger(__name__)


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
        skip_bad_images: leave out images with NaN or infinite pixels and, with background normalisation, images
            whose background is constant (an extra reading pass); their rows are not written to particles.star.
    """

    box_size: int | None = None
    normalize: str = "background"
    mask_radius_fraction: float = 0.85
    invert: bool = False
    skip_bad_images: bool = False
    images_per_stack: int = 50_000
    chunk_size: int = 1_000

    def __post_init__(self) -> None:
        if self.normalize not in NORMALISATIONS:
            raise ConfigError(f"--normalize must be one of {', '.join(NORMALISATIONS)}, not {self.normalize!r}")
        if self.box_size is not None and (self.box_size < 8 or self.box_size % 2):
            raise ConfigError(f"--box must be an even number of pixels >= 8, not {self.box_size}")
        if not 0.1 <= self.mask_radius_fraction <= 1.0:
            raise ConfigError("--mask-radius must lie between 0.1 and 1.0 (fraction of half the box)")
        for option, value in (("--images-per-stack", self.images_per_stack), ("--chunk-size", self.chunk_size)):
            if value < 1:
                raise ConfigError(f"{option} must be at least 1, not {value}")


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
            mean, std = self.background_statistics(tensor)
            self._check_variance(mean, std, indices)
            tensor = (tensor - mean[:, None, None]) / std[:, None, None]
        elif self.config.normalize == "dataset":
            mean, std = self.dataset_stats
            tensor = (tensor - mean) / std
        return tensor.numpy()

    def background_statistics(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image mean and standard deviation (B,) of the pixels outside the particle circle."""
        ring = tensor[:, self.background]
        return ring.mean(dim=1), ring.std(dim=1)

    @staticmethod
    def constant(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the background is constant (zero variance up to float32 rounding)."""
        return std <= _CONSTANT_RELATIVE_STD * mean.abs()

    def _check_variance(self, mean: torch.Tensor, std: torch.Tensor, indices: np.ndarray) -> None:
        flat = torch.nonzero(self.constant(mean, std)).flatten()
        if len(flat):
            rows = ", ".join(str(int(indices[i]) + 1) for i in flat[:_LISTED_ROWS])
            raise InputError(
                self.source_path,
                f"{len(flat)} image(s) have a constant background (zero variance), e.g. particle row(s) {rows}",
                "remove them from the particle file, leave them out with --skip-bad-images, "
                "or use --normalize dataset",
            )


def bad_image_rows(source: ImageSource, transform: ChunkTransform, chunk_size: int) -> np.ndarray:
    """Row positions (0-based, sorted) of the images that cannot be used (see PreprocessConfig.skip_bad_images).

    ``source`` should not check pixels itself (``check_finite=False``).
    """
    bad = []
    for rows, images in source.iter_batches(chunk_size):
        usable = np.isfinite(images).all(axis=(1, 2))
        if transform.config.normalize == "background" and usable.any():
            mean, std = transform.background_statistics(transform.resample(images[usable]))
            usable[usable] = ~transform.constant(mean, std).numpy()
        bad.append(rows[~usable])
    return np.concatenate(bad)


def without_bad_images(table: pd.DataFrame, transform: ChunkTransform, chunk_size: int) -> pd.DataFrame:
    """``table`` less the rows of unusable images (logged with a warning); InputError if none is usable."""
    bad = bad_image_rows(ImageSource(table, check_finite=False), transform, chunk_size)
    what = "NaN or infinite pixels"
    if transform.config.normalize == "background":
        what += " or a constant background"
    if len(bad) == len(table):
        raise InputError(transform.source_path, f"all {len(table)} images have {what}; nothing to preprocess")
    if len(bad):
        rows = ", ".join(str(row + 1) for row in bad[:_LISTED_ROWS]) + (", ..." if len(bad) > _LISTED_ROWS else "")
        _log.warning("%s: leaving out %d image(s) with %s: particle row(s) %s", transform.source_path, len(bad),
                     what, rows)
    keep = np.ones(len(table), dtype=bool)
    keep[bad] = False
    return table[keep]


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
    if config.skip_bad_images:
        table = without_bad_images(table, transform, config.chunk_size)
        source = ImageSource(table)
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
