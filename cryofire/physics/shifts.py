"""In-plane translations applied in Fourier or Hartley space.

``shift_px`` (..., 2) = (sx, sy) always moves the image content by ``+shift_px`` (x = columns,
y = rows): the centred spectrum is multiplied by ``exp(-2 pi i (kx sx + ky sy))``, k in cycles/px.
A RELION particle at ``-origin`` from the box centre is re-centred by ``shift_px = +origin_px``.
"""

from __future__ import annotations

import math

import torch

from cryofire.physics.fft import fft2_centered, ifft2_centered
from cryofire.physics.lattice import frequency_grid_2d


def _shift_phase(shape: torch.Size, shift_px: torch.Tensor) -> torch.Tensor:
    """Phase ``2 pi k . shift`` (..., D, D) in radians for spectra of shape (..., D, D)."""
    freqs = frequency_grid_2d(shape[-1], device=shift_px.device, dtype=shift_px.dtype)
    shift = shift_px[..., None, None, :]
    return 2 * math.pi * (freqs * shift).sum(-1)


def phase_shift_2d(images_ft: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Translate images given by centred spectra (..., D, D) by ``shift_px`` (..., 2) pixels.

    Integer shifts equal a circular ``roll``; fractional shifts are band-limited interpolation
    (on even grids the unpaired Nyquist row and column make the result slightly non-Hermitian:
    take ``.real`` of the inverse transform).
    """
    shift_px = shift_px.to(device=images_ft.device, dtype=images_ft.real.dtype)
    phase = _shift_phase(images_ft.shape, shift_px)
    return images_ft * torch.polar(torch.ones_like(phase), -phase)


def shift_images(images: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Real-space images (..., D, D) moved by ``shift_px`` (..., 2) pixels (:func:`phase_shift_2d`); a particle at
    ``-shift_px`` from the box centre ends up centred."""
    return ifft2_centered(phase_shift_2d(fft2_centered(images), shift_px)).real


def _negated_frequencies(images_ht: torch.Tensor) -> torch.Tensor:
    """``H(-k)`` on centred grids (..., D, D) by periodic index negation about ``D // 2``.

    On even grids index 0 (k = -1/2) is its own partner, since +1/2 aliases onto -1/2.
    """
    roll = 1 - images_ht.shape[-1] % 2
    flipped = torch.flip(images_ht, dims=(-2, -1))
    return torch.roll(flipped, shifts=(roll, roll), dims=(-2, -1))


def hartley_shift_2d(images_ht: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Translate images given by centred Hartley transforms (..., D, D) by ``shift_px`` (..., 2).

    For a real image ``F(-k) = conj F(k)``, so ``Re F = (H(k) + H(-k)) / 2`` and
    ``Im F = (H(-k) - H(k)) / 2``; multiplying F by ``exp(-i phi)`` gives
    ``H'(k) = H(k) cos(phi) + H(-k) sin(phi)`` with ``phi = 2 pi k . shift``.
    This equals the Hartley transform of the Fourier-shifted image at every frequency except the
    even grid's Nyquist row and column (index 0), which are treated as self-paired; there the two
    agree for integer shifts.
    """
    shift_px = shift_px.to(device=images_ht.device, dtype=images_ht.dtype)
    phase = _shift_phase(images_ht.shape, shift_px)
    return images_ht * torch.cos(phase) + _negated_frequencies(images_ht) * torch.sin(phase)
