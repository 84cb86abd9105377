"""Training schedules counted in images seen, as fractions of the planned total.

The official cryoFIRE schedule is fixed in absolute numbers (start at 3 lattice px, +1 px per
100,000 images; a pose-only phase of 10,000,000 images), sized for millions of particles. Here
every phase ends at a fraction of ``planned_images`` (the number of images the run will see), so
the same configuration scales from a 10,000-image CPU run to a multi-million-image GPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cryofire.errors import ConfigError


@dataclass(frozen=True)
class ScheduleConfig:
    """Frequency marching and the pose-only phase.

    Attributes:
        planned_images: images the run will see in total (epochs x dataset size).
        start_radius_px: radius of the Fourier disk fitted at the start, in lattice pixels
            (``|k| * D``); at least 1 (the DC term is never fitted).
        max_radius_px: final radius in lattice pixels; ``None`` means Nyquist, ``D / 2``.
        marching_fraction: fraction of ``planned_images`` after which the radius reaches its
            maximum; it grows linearly in images seen until then. 0 disables marching.
        pose_only_fraction: fraction of ``planned_images`` during which the decoder gets random
            latents instead of the encoder's, so it learns a consensus map while poses form.
        pose_only_z_std: standard deviation of those random latents (the variational prior's
            scale is 1).
    """

    planned_images: int = 1_000_000
    start_radius_px: float = 4.0
    max_radius_px: float | None = None
    marching_fraction: float = 0.5
    pose_only_fraction: float = 0.25
    pose_only_z_std: float = 1.0

    def __post_init__(self) -> None:
        if self.planned_images < 1:
            raise ConfigError(f"planned_images must be positive, got {self.planned_images}")
        if self.start_radius_px < 1:
            raise ConfigError(f"start_radius_px must be >= 1, got {self.start_radius_px}")
        if self.max_radius_px is not None and self.max_radius_px < self.start_radius_px:
            raise ConfigError("max_radius_px must be >= start_radius_px")
        for name in ("marching_fraction", "pose_only_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pose_only_z_std <= 0:
            raise ConfigError(f"pose_only_z_std must be positive, got {self.pose_only_z_std}")


def progress(images_seen: int, planned_images: int) -> float:
    """Fraction of the planned images seen so far, clipped to [0, 1]."""
    return min(max(images_seen / planned_images, 0.0), 1.0)


def frequency_radius_px(images_seen: int, box_size: int, config: ScheduleConfig) -> float:
    """Radius in lattice pixels of the Fourier disk fitted after ``images_seen`` images.

    Grows linearly from ``start_radius_px`` to ``max_radius_px`` (default ``D / 2``) over the
    first ``marching_fraction`` of the planned images, then stays there.
    """
    end_px = box_size / 2 if config.max_radius_px is None else config.max_radius_px
    end_px = min(end_px, box_size / 2)
    start_px = min(config.start_radius_px, end_px)
    if config.marching_fraction == 0.0:
        return end_px
    ramp = min(progress(images_seen, config.planned_images) / config.marching_fraction, 1.0)
    return start_px + (end_px - start_px) * ramp


def in_pose_only_phase(images_seen: int, config: ScheduleConfig) -> bool:
    """True while the decoder must get random latents instead of the encoder's."""
    return progress(images_seen, config.planned_images) < config.pose_only_fraction


def pose_only_latents(
    batch_size: int, zdim: int, config: ScheduleConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fresh random latents (B, zdim) ~ N(0, pose_only_z_std^2) for the pose-only phase."""
    return config.pose_only_z_std * torch.randn(batch_size, zdim, device=device)
