"""ModelConfig: every option of :class:`cryofire.model.CryoFireModel`, with units and defaults.

Flat so that a YAML file or a checkpoint stores it as one mapping (``asdict`` / ``from_dict``);
the encoder, decoder and schedule configurations are derived from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cryofire.errors import ConfigError
from cryofire.model.decoder import DecoderConfig
from cryofire.model.encoder import EncoderConfig
from cryofire.model.schedule import ScheduleConfig

POSE_MODES = ("abinit", "fixed", "refine")


@dataclass(frozen=True)
class ModelConfig:
    """Options of the amortized model.

    Attributes:
        box_size: image size D in pixels (16 to 256).
        pose_mode: 'abinit' (encoder predicts poses), 'fixed' (poses from the batch) or
            'refine' (encoder predicts a correction to the poses from the batch).
        symmetric_loss: also encode each image mirrored along x and keep the better pose
            ('abinit' only; doubles the decoder work).
        num_pose_heads: pose hypotheses per image path, winner-takes-all (multiplies the
            decoder work).
        zdim: latent dimension; 0 for a homogeneous reconstruction.
        variational: the encoder predicts a log-variance and z is sampled while training.
        kl_weight: weight of the KL (nats per image) against the data loss (mean squared
            error per Fourier coefficient, unit-variance-noise scale); used if variational.
        max_shift_fraction: bound on predicted shifts as a fraction of D (0.1: +-D/10 px).
        encoder_channels: channels of the first CNN stage (doubling per stage).
        encoder_max_channels: channel cap of the CNN.
        encoder_hidden_dim: width of the MLPs before the encoder heads.
        encoder_inplane_canonical: the encoder turns each image to the axis of its low-resolution second moment
            and turns its predicted pose and shift back, so in-plane turns need not be learned (ab initio;
            not with pose_mode refine).
        encoder_recentre: the encoder reads each image twice, the second time re-centred by the shift it found
            the first time (twice the encoder's work; one pose head only).
        decoder_width: hidden width of the hypervolume's residual MLP.
        decoder_depth: residual blocks of the hypervolume.
        num_fourier_features: random Fourier feature vectors of the positional encoding.
        fourier_feature_sigma_fraction: std of their real-space positions as a fraction of D.
        feature_seed: seed of the frozen Fourier features.
        window_inner_fraction: soft real-space window applied to every image: 1 within this
            fraction of D / 2 from the centre ...
        window_outer_fraction: ... falling (raised cosine) to 0 at this fraction of D / 2.
            (An inner fraction >= 1.42 leaves the box untouched.)
        planned_images: images the run will see in total; schedules are fractions of it.
        start_radius_px: Fourier radius fitted at the start, lattice px.
        max_radius_px: final Fourier radius, lattice px; None for Nyquist (D / 2).
        marching_fraction: fraction of ``planned_images`` over which the radius grows.
        pose_only_fraction: fraction of ``planned_images`` with random latents for the decoder.
        pose_only_z_std: standard deviation of those random latents.
        pose_target_weight: weight of the encoder's pose-regression loss while a pose search
            teaches it (chordal distance of rotations plus squared shift error in units of the
            shift bound), against the data loss.
        class_target_weight: weight of the encoder's latent loss while a classical ab initio teaches it
            classes (``--teacher em``): squared error of the first K latent coordinates to the class's centred
            one-hot vector (one-hot minus 1/K), K classes.
    """

    box_size: int
    pose_mode: str = "abinit"
    symmetric_loss: bool = True
    num_pose_heads: int = 1
    zdim: int = 8
    variational: bool = False
    kl_weight: float = 1e-3
    max_shift_fraction: float = 0.1
    encoder_channels: int = 32
    encoder_max_channels: int = 256
    encoder_hidden_dim: int = 256
    encoder_inplane_canonical: bool = False
    encoder_recentre: bool = False
    decoder_width: int = 256
    decoder_depth: int = 3
    num_fourier_features: int = 64
    fourier_feature_sigma_fraction: float = 0.125
    feature_seed: int = 0
    window_inner_fraction: float = 0.85
    window_outer_fraction: float = 0.99
    planned_images: int = 1_000_000
    start_radius_px: float = 4.0
    max_radius_px: float | None = None
    marching_fraction: float = 0.5
    pose_only_fraction: float = 0.25
    pose_only_z_std: float = 1.0
    pose_target_weight: float = 1.0
    class_target_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 16 <= self.box_size <= 512:
            raise ConfigError(f"box_size must be in 16..512 px, got {self.box_size}")
        if self.pose_mode not in POSE_MODES:
            raise ConfigError(f"pose_mode must be one of {POSE_MODES}, got {self.pose_mode!r}")
        if not 0 <= self.window_inner_fraction < self.window_outer_fraction:
            raise ConfigError("need 0 <= window_inner_fraction < window_outer_fraction")
        if self.kl_weight < 0 or self.max_shift_fraction < 0:
            raise ConfigError("kl_weight and max_shift_fraction must be >= 0")
        if self.encoder_inplane_canonical and self.pose_mode == "refine":
            raise ConfigError("encoder_inplane_canonical cannot be used with pose_mode refine (the encoder's "
                              "correction must start at the identity)")
        self.encoder_config()
        self.decoder_config()
        self.schedule_config()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. a YAML section); unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """All options as a plain dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    def encoder_config(self) -> EncoderConfig:
        """The encoder's options (the shift bound converted to pixels)."""
        return EncoderConfig(
            zdim=self.zdim,
            variational=self.variational,
            num_pose_heads=self.num_pose_heads,
            channels=self.encoder_channels,
            max_channels=self.encoder_max_channels,
            hidden_dim=self.encoder_hidden_dim,
            inplane_canonical=self.encoder_inplane_canonical,
            recentre=self.encoder_recentre,
            max_shift_px=self.max_shift_fraction * self.box_size,
        )

    def decoder_config(self) -> DecoderConfig:
        """The hypervolume's options."""
        return DecoderConfig(
            zdim=self.zdim,
            width=self.decoder_width,
            depth=self.decoder_depth,
            num_features=self.num_fourier_features,
            feature_sigma_fraction=self.fourier_feature_sigma_fraction,
            feature_seed=self.feature_seed,
        )

    def schedule_config(self) -> ScheduleConfig:
        """The frequency-marching and pose-only schedule."""
        return ScheduleConfig(
            planned_images=self.planned_images,
            start_radius_px=self.start_radius_px,
            max_radius_px=self.max_radius_px,
            marching_fraction=self.marching_fraction,
            pose_only_fraction=self.pose_only_fraction,
            pose_only_z_std=self.pose_only_z_std,
        )
