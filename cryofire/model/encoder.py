"""The amortized encoder: a CNN over real-space images with pose and conformation heads.

Layout: per-image standardisation -> ``n`` stages of [conv3x3, GroupNorm, ReLU] x 2 + 2x2 average
pooling (``n`` derived from the box so the last map is about 4 x 4 px) -> adaptive pooling to
exactly 4 x 4 -> two separate two-layer MLPs, one for the pose heads, one for the conformation
head. Compared with the official code (GroupNorm after pooling, single linear heads on the CNN
features, unbounded shifts) the MLPs give the heads a nonlinear read-out, the separate branches
keep the latent's training (after the pose-only phase) from reshaping the pose read-out, and the
shift is bounded. These are design choices meant to ease convergence at low SNR, not measured
here: check them against rotation error on simulated data.

With ``inplane_canonical`` each image is first turned in-plane so that the axis of its low-resolution second
moment lies along x (the angle from one dot product with a fixed kernel), and the predicted poses and shifts are
turned back by the same angle. The axis has no direction, so the CNN sees each view at one of two orientations
180 degrees apart, whatever in-plane angle it came in at, instead of learning the in-plane angle from examples; a
turn of the input turns the predictions with it as long as the axis angle stays in (-90, 90] degrees. Measured in
bench/RESULTS.md (fourteenth session).

With ``recentre`` the image is encoded twice with the same weights: the first pass's shift re-centres it (a phase
ramp), and the second pass gives the pose, the conformation and the shift left over, added to the first. The CNN then
sees nearly centred particles, which it reads far better than shifted ones (bench/RESULTS.md, fifteenth session).

Heads, for each of ``num_pose_heads`` hypotheses (winner-takes-all, METHOD.md section 7):
rotation (6 numbers -> S2S2 Gram-Schmidt -> RELION matrix) and shift (2 numbers ->
``max_shift_px * tanh``, bounded, in pixels, the RELION-origin sign: it re-centres the image).
Conformation: z mean, and for a variational encoder a log-variance bounded to
``[-LOGVAR_BOUND, LOGVAR_BOUND]`` by a scaled tanh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from cryofire.errors import ConfigError
from cryofire.physics import (circular_mask, fft2_centered, frequency_grid_2d, ifft2_centered, inplane_rotation_matrix,
                              rotate_images, s2s2_to_matrix, shift_images)

LOGVAR_BOUND = 8.0
FINAL_MAP_PX = 4
_IDENTITY_S2S2 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class EncoderConfig:
    """Encoder hyper-parameters.

    Attributes:
        zdim: latent (conformation) dimension; 0 for a homogeneous model (no conformation head).
        variational: predict a log-variance with the latent mean.
        num_pose_heads: pose hypotheses per image (winner-takes-all).
        channels: channels of the first CNN stage; doubled at each stage up to ``max_channels``.
        max_channels: channel cap.
        hidden_dim: width of the MLPs between the CNN and the heads.
        max_shift_px: bound on the predicted shifts, in pixels of the input box.
        inplane_canonical: turn each image to the axis of its low-resolution second moment before the CNN and
            turn the predicted poses and shifts back (in-plane equivariance).
        recentre: encode twice, the second time the image re-centred by the first pass's shift; the shift is the
            sum of the two passes' (so up to twice ``max_shift_px``). One pose head only.
    """

    zdim: int = 8
    variational: bool = False
    num_pose_heads: int = 1
    channels: int = 32
    max_channels: int = 256
    hidden_dim: int = 256
    max_shift_px: float = 3.0
    inplane_canonical: bool = False
    recentre: bool = False

    def __post_init__(self) -> None:
        if self.zdim < 0 or self.num_pose_heads < 1 or self.max_shift_px < 0:
            raise ConfigError("need zdim >= 0, num_pose_heads >= 1 and max_shift_px >= 0")
        if min(self.channels, self.max_channels, self.hidden_dim) < 1:
            raise ConfigError("channels, max_channels and hidden_dim must be positive")
        if self.recentre and self.num_pose_heads > 1:
            raise ConfigError("recentre needs a single pose head (one shift to re-centre each image by)")


@dataclass
class EncoderOutput:
    """What the encoder predicts for a batch of B images with H pose heads.

    Attributes:
        rotations: (B, H, 3, 3) RELION rotation matrices.
        shifts_px: (B, H, 2) shifts (x, y) in pixels that re-centre each image.
        z_mean: (B, zdim) latent means.
        z_logvar: (B, zdim) bounded log-variances, or None for a deterministic encoder.
    """

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    z_mean: torch.Tensor
    z_logvar: torch.Tensor | None

    def rows(self, index: slice) -> EncoderOutput:
        """The predictions for a slice of the batch."""
        logvar = None if self.z_logvar is None else self.z_logvar[index]
        return EncoderOutput(
            self.rotations[index], self.shifts_px[index], self.z_mean[index], logvar
        )


def num_stages(box_size: int) -> int:
    """Pooling stages for a D-pixel box: ``floor(log2(D / 4))``, at least 1 (D=16: 2, D=256: 6)."""
    return max(1, int(math.floor(math.log2(box_size / FINAL_MAP_PX))))


def _conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm and ReLU, then 2x2 average pooling (halves D)."""
    groups = math.gcd(8, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(),
        nn.AvgPool2d(2),
    )


def second_moment_kernel(box_size: int) -> torch.Tensor:
    """Kernel (2, D, D) whose dot products with an image are the real and imaginary parts of its second circular
    moment ``sum_r image(r) exp(2 i theta(r))`` over ``0 < |r| < 0.4 D``, low-passed to ``D / 5`` frequency px (the
    molecule's outline, not the noise). Half the moment's phase is the image's axis angle."""
    offsets = frequency_grid_2d(box_size, dtype=torch.float64) * box_size  # (D, D, 2): x, y px
    theta = torch.atan2(offsets[..., 1], offsets[..., 0])
    radius = offsets.norm(dim=-1)
    inside = (radius > 0) & (radius < 0.4 * box_size)  # the centre has no angle
    moment = torch.polar(inside.double(), 2 * theta)
    lowpassed = ifft2_centered(fft2_centered(moment) * circular_mask(box_size, box_size / 5))
    return torch.stack((lowpassed.real, lowpassed.imag)).float()


def _mlp(in_features: int, hidden_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
    )


def _standardise(images: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per image: (B, D, D) -> (B, 1, D, D)."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    std = images.std(dim=(-2, -1), keepdim=True)
    return ((images - mean) / (std + 1e-6))[:, None]


class ImageEncoder(nn.Module):
    """Images (B, D, D) in real space (already windowed) -> :class:`EncoderOutput`."""

    def __init__(self, box_size: int, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        stages = range(num_stages(box_size))
        widths = [min(config.channels * 2**i, config.max_channels) for i in stages]
        convs = [_conv_stage(c_in, c_out) for c_in, c_out in zip([1, *widths[:-1]], widths)]
        self.cnn = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(FINAL_MAP_PX), nn.Flatten())
        features = widths[-1] * FINAL_MAP_PX**2
        heads = config.num_pose_heads
        self.pose_mlp = _mlp(features, config.hidden_dim)
        self.rotation_head = nn.Linear(config.hidden_dim, 6 * heads)
        self.shift_head = nn.Linear(config.hidden_dim, 2 * heads)
        nn.init.zeros_(self.shift_head.weight)
        nn.init.zeros_(self.shift_head.bias)
        self.conformation_mlp = _mlp(features, config.hidden_dim) if config.zdim else None
        z_outputs = config.zdim * (2 if config.variational else 1)
        self.conformation_head = nn.Linear(config.hidden_dim, z_outputs) if config.zdim else None
        kernel = second_moment_kernel(box_size) if config.inplane_canonical else None
        self.register_buffer("moment_kernel", kernel, persistent=False)

    def start_at_identity(self) -> None:
        """Make every pose head output the identity rotation and a zero shift for any input, so
        the encoder starts as a zero correction (pose mode 'refine')."""
        with torch.no_grad():
            self.rotation_head.weight.zero_()
            identity = self.rotation_head.bias.new_tensor(_IDENTITY_S2S2)
            self.rotation_head.bias.copy_(identity.repeat(self.config.num_pose_heads))

    def axis_angles_deg(self, images: torch.Tensor) -> torch.Tensor:
        """In-plane angle (B,) in degrees, in (-90, 90], of the axis of each image's low-resolution second moment;
        an image turned by ``a`` has its axis at ``angle + a`` (modulo 180)."""
        moment = torch.einsum("cyx,byx->bc", self.moment_kernel, images.float())
        return torch.rad2deg(torch.atan2(moment[:, 1], moment[:, 0])) / 2

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """Encode images (B, D, D); see :class:`EncoderOutput` for the shapes."""
        out = self.encode_once(images)
        if not self.config.recentre:
            return out
        first_shift = out.shifts_px[:, 0]  # (B, 2); the sum below trains it, the re-centring does not
        with torch.autocast(images.device.type, enabled=False):
            recentred = shift_images(images.float(), first_shift.detach()).to(images.dtype)
        second = self.encode_once(recentred)
        return replace(second, shifts_px=first_shift[:, None] + second.shifts_px)

    def encode_once(self, images: torch.Tensor) -> EncoderOutput:
        """One pass, without re-centring: the CNN and heads, on the in-plane canonical images with
        ``inplane_canonical``."""
        if not self.config.inplane_canonical:
            return self._encode(images)
        with torch.autocast(images.device.type, enabled=False):  # an angle, not a feature: full precision
            angles = self.axis_angles_deg(images)
            canonical = rotate_images(images.float(), -angles).to(images.dtype)
        out = self._encode(canonical)
        turn = inplane_rotation_matrix(angles)[:, None]  # (B, 1, 3, 3): the canonical image's pose -> the input's
        shifts = (turn[..., :2, :2] @ out.shifts_px[..., None])[..., 0]
        return EncoderOutput(turn @ out.rotations, shifts, out.z_mean, out.z_logvar)

    def _encode(self, images: torch.Tensor) -> EncoderOutput:
        """The CNN and heads on images (B, D, D) as given."""
        features = self.cnn(_standardise(images))
        pose_features = self.pose_mlp(features)
        batch, heads = images.shape[0], self.config.num_pose_heads
        s2s2 = self.rotation_head(pose_features).float().view(batch, heads, 6)
        raw_shift = self.shift_head(pose_features).float().view(batch, heads, 2)
        z_mean, z_logvar = self._conformation(features)
        return EncoderOutput(
            rotations=s2s2_to_matrix(s2s2),
            shifts_px=self.config.max_shift_px * torch.tanh(raw_shift),
            z_mean=z_mean,
            z_logvar=z_logvar,
        )

    def _conformation(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latent mean (B, zdim) and bounded log-variance (B, zdim) or None."""
        if self.conformation_head is None:
            return features.new_zeros(features.shape[0], 0).float(), None
        out = self.conformation_head(self.conformation_mlp(features)).float()
        if not self.config.variational:
            return out, None
        mean, raw_logvar = out.chunk(2, dim=-1)
        return mean, LOGVAR_BOUND * torch.tanh(raw_logvar / LOGVAR_BOUND)
