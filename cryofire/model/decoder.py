"""The hypervolume: a coordinate network for the 3D Fourier transform of a volume given z.

Domain choice: Fourier, half space, two outputs (Re, Im) -- not Hartley with one output.
A real map satisfies Friedel symmetry ``F(-k) = conj F(k)``; the network is only ever evaluated
on the half space ``k_z <= 0`` (a query with ``k_z > 0`` is answered by ``conj F(-k)``). Why:
  * half the network evaluations per image (the decoder dominates the run time): a central slice
    is point-symmetric, so one evaluation gives the spectrum at ``k`` and ``-k``
    (:class:`cryofire.model.image_formation.HalfPlaneLattice` queries only half the disk);
  * every Fourier coefficient of the map is represented once, so the map is real by construction
    and the network need not learn the symmetry from data;
  * shifts are a per-point phase factor on the queried points alone, whereas a Hartley shift
    needs ``H(-k)`` from the full grid.

Values are the centred FT of the volume divided by the box size D (``fft3_centered(V) / D``):
with that scale a central slice equals ``fft2_centered(projection) / D``, whose noise has unit
variance per coefficient for unit-variance pixel noise. Coordinates are frequencies in cycles per
pixel of the training box (Nyquist 0.5). The positional encoding is Gaussian random Fourier
features ``[cos, sin](2 pi k . r_j)`` with frozen positions ``r_j`` (px) ~ N(0, sigma^2 I3),
``sigma = feature_sigma_fraction * D``: each feature is the spectrum of a point at ``r_j`` in
real space, so sigma is the spatial extent the features cover. The encoding is computed in
float32 even under autocast (phases reach hundreds of radians, beyond bf16 precision).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cryofire.errors import ConfigError
from cryofire.physics import frequency_grid_3d, ifft3_centered

_RENDER_CHUNK_POINTS = 1 << 16


@dataclass(frozen=True)
class DecoderConfig:
    """Hypervolume hyper-parameters.

    Attributes:
        zdim: latent dimension (0: homogeneous).
        width: hidden width of the residual MLP.
        depth: number of residual blocks.
        num_features: random Fourier feature vectors (the encoding has 2x as many values).
        feature_sigma_fraction: std of the feature positions r_j as a fraction of the box (px / D).
        feature_seed: seed of the frozen feature positions (reproducible models).
    """

    zdim: int = 8
    width: int = 256
    depth: int = 3
    num_features: int = 64
    feature_sigma_fraction: float = 0.125
    feature_seed: int = 0

    def __post_init__(self) -> None:
        if self.zdim < 0 or min(self.width, self.num_features) < 1 or self.depth < 0:
            raise ConfigError("need zdim >= 0, width >= 1, num_features >= 1 and depth >= 0")
        if self.feature_sigma_fraction <= 0:
            raise ConfigError("feature_sigma_fraction must be positive")


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.relu(self.linear(hidden))


class HyperVolume(nn.Module):
    """``F(k; z)``: (..., n, 3) frequencies (cycles/px) and (..., zdim) latents -> (..., n, 2)."""

    def __init__(self, box_size: int, config: DecoderConfig) -> None:
        super().__init__()
        self.box_size = box_size
        self.config = config
        generator = torch.Generator().manual_seed(config.feature_seed)
        positions_px = torch.randn(config.num_features, 3, generator=generator)
        sigma_px = config.feature_sigma_fraction * box_size
        self.register_buffer("feature_positions_px", positions_px * sigma_px)
        self.coordinate_layer = nn.Linear(2 * config.num_features, config.width)
        self.latent_layer = (
            nn.Linear(config.zdim, config.width, bias=False) if config.zdim else None
        )
        self.blocks = nn.Sequential(*[_ResidualBlock(config.width) for _ in range(config.depth)])
        self.output_layer = nn.Linear(config.width, 2)

    def encode_coordinates(self, coords: torch.Tensor) -> torch.Tensor:
        """Random Fourier features (..., 2F), in float32 whatever the autocast state."""
        with torch.autocast(device_type=coords.device.type, enabled=False):
            phase = (2 * math.pi) * coords.float() @ self.feature_positions_px.T
            return torch.cat((torch.cos(phase), torch.sin(phase)), dim=-1)

    def forward(self, coords: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Fourier values (Re, Im) (..., n, 2) / D of the volume at ``coords`` (..., n, 3).

        ``z`` (..., zdim) holds one latent per leading index (it broadcasts over the n points).
        """
        flip = coords[..., 2:3] > 0
        canonical = torch.where(flip, -coords, coords)
        hidden = self.coordinate_layer(self.encode_coordinates(canonical))
        if self.latent_layer is not None:
            hidden = hidden + self.latent_layer(z)[..., None, :]
        out = self.output_layer(self.blocks(torch.relu(hidden))).float()
        return torch.cat((out[..., :1], torch.where(flip, -out[..., 1:], out[..., 1:])), dim=-1)

    @torch.no_grad()
    def render_volume(self, z: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Real-space volume (S, S, S) indexed [z, y, x] for one latent ``z`` (zdim,).

        ``size`` defaults to the training box D; another size S resamples the same map (pixel
        size scaled by D / S, densities kept). Frequencies beyond the training Nyquist are zero.
        Its projections (sums along z, at S = D) reproduce the training images' units.
        """
        size = size or self.box_size
        device = self.feature_positions_px.device
        coords = frequency_grid_3d(size, device=device).reshape(-1, 3) * (size / self.box_size)
        values = torch.zeros(coords.shape[0], 2, device=device)
        inside = (coords.norm(dim=-1) <= 0.5).nonzero().squeeze(-1)
        latent = z.to(device)[None]
        for chunk in inside.split(_RENDER_CHUNK_POINTS):
            values[chunk] = self(coords[chunk][None], latent)[0]
        spectrum = torch.complex(values[:, 0], values[:, 1]).reshape(size, size, size)
        scale = self.box_size * (size / self.box_size) ** 3
        return ifft3_centered(spectrum * scale).real
