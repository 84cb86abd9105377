"""Fourier and Hartley image shifts (shift_images: real-space images moved by phase ramps): direction, RELION
origin sign, Hartley formula."""

import math

import torch

from cryofire.physics import (
    circular_mask,
    fft2_centered,
    hartley2,
    hartley_shift_2d,
    ifft2_centered,
    phase_shift_2d,
    shift_images,
)

F64 = torch.float64
SIZE = 32


def _band_limited_images(n: int, seed: int) -> torch.Tensor:
    """Random real images (n, D, D) with no power at or beyond |k| D = D/2 - 2."""
    noise = torch.randn(n, SIZE, SIZE, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return ifft2_centered(fft2_centered(noise) * circular_mask(SIZE, SIZE // 2 - 2)).real


def _gaussian(centre_x: float, centre_y: float, sigma: float = 2.0) -> torch.Tensor:
    c = torch.arange(SIZE, dtype=F64) - SIZE // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * sigma**2))


def test_integer_shift_equals_roll_of_columns_and_rows():
    images = _band_limited_images(2, seed=0)
    shifted = shift_images(images, torch.tensor([3.0, -2.0], dtype=F64))
    assert torch.allclose(shifted, torch.roll(images, shifts=(-2, 3), dims=(-2, -1)), atol=1e-12)


def test_per_image_shifts_move_a_blob_by_plus_shift():
    shifts = torch.tensor([[1.5, 0.0], [0.0, -2.25]], dtype=F64)
    shifted = shift_images(torch.stack([_gaussian(0, 0), _gaussian(0, 0)]), shifts)
    assert torch.allclose(shifted[0], _gaussian(1.5, 0), atol=1e-9)
    assert torch.allclose(shifted[1], _gaussian(0, -2.25), atol=1e-9)


def test_relion_origin_recentres_the_particle():
    origin_px = (2.5, -1.75)  # rlnOriginX/YAngst / pixel size
    particle = _gaussian(-origin_px[0], -origin_px[1])  # sits at centre - origin
    recentred = shift_images(particle, torch.tensor(origin_px, dtype=F64))
    assert torch.allclose(recentred, _gaussian(0, 0), atol=1e-9)


def test_hartley_shift_matches_fourier_shift_for_band_limited_images():
    images = _band_limited_images(3, seed=1)
    shifts = torch.tensor([[1.3, -0.7], [0.0, 4.2], [-2.5, 0.25]], dtype=F64)
    expected = hartley2(shift_images(images, shifts))
    assert torch.allclose(hartley_shift_2d(hartley2(images), shifts), expected, atol=1e-10)


def test_hartley_shift_off_nyquist_and_integer_shifts_everywhere():
    noise = torch.randn(2, SIZE, SIZE, dtype=F64, generator=torch.Generator().manual_seed(2))
    fractional = torch.tensor([0.4, -1.6], dtype=F64)
    got = hartley_shift_2d(hartley2(noise), fractional)
    expected = hartley2(shift_images(noise, fractional))
    assert torch.allclose(got[..., 1:, 1:], expected[..., 1:, 1:], atol=1e-10)
    integer = torch.tensor([-3.0, 5.0], dtype=F64)
    rolled = torch.roll(noise, shifts=(5, -3), dims=(-2, -1))
    assert torch.allclose(hartley_shift_2d(hartley2(noise), integer), hartley2(rolled), atol=1e-10)


def test_shift_keeps_float32():
    images_ft = fft2_centered(torch.randn(2, SIZE, SIZE))
    out = phase_shift_2d(images_ft, torch.tensor([[0.5, 0.5], [1.0, -1.0]]))
    assert out.dtype == torch.complex64
    assert math.isclose(float(out[0, 16, 16].abs()), float(images_ft[0, 16, 16].abs()), rel_tol=1e-6)
