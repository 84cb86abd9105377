"""Image formation on the fitted frequencies: slice the hypervolume, apply the CTF, re-centre.

Fitted frequencies. A central slice is point-symmetric and the decoder answers for ``k`` and
``-k`` at once (Friedel), so only half of the centred 2D lattice is used: the points with
``ky > 0``, or ``ky = 0`` and ``kx > 0`` (DC excluded, as in cryoFIRE), within ``D / 2`` lattice px
(every such point has its partner ``-k`` on the grid). They are sorted by radius, so the disk of
any radius (frequency marching) is a prefix of the buffers: no mask, no gather of a new index set
and no allocation per batch.

Spectra are real pairs (Re, Im) (..., n, 2), scaled as ``fft2_centered(image) / D``.
Coordinates and phases are computed in float32 even under autocast: a bf16 matmul would put
errors of ~0.4 % on frequencies and shift phases (tenths of a radian at high frequency).

Shifts are applied to the OBSERVED image, by the phase ramp ``exp(-2 pi i k . t)`` of
docs/conventions.md: the image content moves by ``+t`` (x, y) px, which re-centres a particle
sitting at ``centre - t`` (``t`` = RELION origin in px). The prediction is always a centred
projection, so the decoder's slices never depend on the shift. (The squared error is the same
either way; this choice gives shifts their RELION meaning.)

Slice coordinates: the 3D frequency sampled at image frequency ``k = (kx, ky, 0)`` for pose A is
``A^T k`` (RELION), as row vectors ``k @ A``; only A's first two rows matter.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import nn

from cryofire.physics import fft2_centered, frequency_grid_2d


class HalfPlaneLattice(nn.Module):
    """Half of the centred (D, D) frequency lattice within ``D / 2`` px, sorted by radius.

    Buffers: ``coords`` (M, 2) frequencies (kx, ky) in cycles/px; ``flat_index`` (M,) positions in a
    flattened (D * D) centred spectrum; ``radius_px`` (M,) radii in lattice px (non-decreasing).
    """

    def __init__(self, box_size: int) -> None:
        super().__init__()
        self.box_size = box_size
        freqs = frequency_grid_2d(box_size, dtype=torch.float64).reshape(-1, 2)
        kx, ky = freqs.unbind(-1)
        radius_px = freqs.norm(dim=-1) * box_size
        half = ((ky > 0) | ((ky == 0) & (kx > 0))) & (radius_px <= box_size / 2)
        flat_index = half.nonzero().squeeze(-1)
        order = torch.argsort(radius_px[flat_index], stable=True)
        flat_index = flat_index[order]
        # Derived from the box size alone: moved with the module, not saved in checkpoints.
        self.register_buffer("coords", freqs[flat_index].float(), persistent=False)
        self.register_buffer("flat_index", flat_index, persistent=False)
        self.register_buffer("radius_px", radius_px[flat_index].float(), persistent=False)
        self._radii_px = radius_px[flat_index].tolist()

    def count_within(self, radius_px: float) -> int:
        """Number n of lattice points with radius <= ``radius_px``: the disk is ``coords[:n]``."""
        return bisect.bisect_right(self._radii_px, radius_px + 1e-6)

    def gather(self, spectra: torch.Tensor, count: int) -> torch.Tensor:
        """Values of centred (B, D, D) grids at the first ``count`` points: (B, count)."""
        return spectra.reshape(*spectra.shape[:-2], -1)[..., self.flat_index[:count]]


def observed_spectrum(images: torch.Tensor, lattice: HalfPlaneLattice, count: int) -> torch.Tensor:
    """Real images (B, D, D) -> their spectra at the first ``count`` points, (B, count, 2).

    Computed in float32 outside autocast, scaled by 1 / D.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        spectra = lattice.gather(fft2_centered(images.float()), count) / lattice.box_size
    return torch.stack((spectra.real, spectra.imag), dim=-1)


def recentre(observed: torch.Tensor, coords: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Move observed images by ``+shifts_px`` for each hypothesis.

    Args:
        observed: (B, n, 2) spectra (Re, Im).
        coords: (n, 2) frequencies (kx, ky) in cycles/px.
        shifts_px: (B, P, 2) shifts (x, y) in pixels.

    Returns:
        (B, P, n, 2): ``observed * exp(-2 pi i k . shift)``.
    """
    with torch.autocast(device_type=coords.device.type, enabled=False):
        phase = (2 * math.pi) * (shifts_px.float() @ coords.float().T)
    cos, sin = torch.cos(phase), torch.sin(phase)
    real, imag = observed[:, None, :, 0], observed[:, None, :, 1]
    return torch.stack((real * cos + imag * sin, imag * cos - real * sin), dim=-1)


def slice_coordinates(rotations: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """3D frequencies ``A^T (kx, ky, 0)`` (B, P, n, 3) for rotations (B, P, 3, 3), coords (n, 2),
    in float32 whatever the autocast state."""
    with torch.autocast(device_type=coords.device.type, enabled=False):
        return coords.float() @ rotations[..., :2, :].float()


def predict_spectrum(
    decoder: nn.Module,
    rotations: torch.Tensor,
    z: torch.Tensor,
    coords: torch.Tensor,
    ctf: torch.Tensor | None,
) -> torch.Tensor:
    """Predicted centred image spectra (B, P, n, 2) for each pose hypothesis.

    Args:
        decoder: maps (B, P, n, 3) frequencies and (B, P, zdim) latents to (B, P, n, 2).
        rotations: (B, P, 3, 3) RELION matrices.
        z: (B, P, zdim) latents.
        coords: (n, 2) fitted frequencies in cycles/px.
        ctf: (B, n) CTF values at those frequencies, or None for no CTF.
    """
    predicted = decoder(slice_coordinates(rotations, coords), z)
    if ctf is None:
        return predicted
    return predicted * ctf[:, None, :, None]
