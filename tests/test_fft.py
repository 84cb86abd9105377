"""Centred FFT/Hartley conventions, Fourier cropping and the frequency lattice."""

import math

import pytest
import torch

from cryofire.physics import (
    circular_mask,
    downsample_images,
    downsample_volume,
    fft2_centered,
    fft3_centered,
    fourier_crop2,
    frequency_grid_2d,
    frequency_grid_3d,
    hartley2,
    hartley3,
    ifft2_centered,
    ifft3_centered,
    ihartley2,
    ihartley3,
    radial_frequency_px,
    real_space_disk_mask,
    soft_circular_window,
)


def _centred_xy(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel offsets (y, x) from the box centre, each (D, D), float64."""
    c = torch.arange(size, dtype=torch.float64) - size // 2
    return torch.meshgrid(c, c, indexing="ij")


@pytest.mark.parametrize("size", [16, 17])
def test_round_trips_2d_and_3d_with_batch_axes(size):
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    volume = torch.randn(2, size, size, size, dtype=torch.float64)
    assert torch.allclose(ifft2_centered(fft2_centered(images)).real, images, atol=1e-12)
    assert torch.allclose(ifft3_centered(fft3_centered(volume)).real, volume, atol=1e-12)
    assert torch.allclose(ihartley2(hartley2(images)), images, atol=1e-12)
    assert torch.allclose(ihartley3(hartley3(volume)), volume, atol=1e-12)


@pytest.mark.parametrize("size", [16, 17])
def test_dc_and_real_space_origin_at_index_half_size(size):
    centre = size // 2
    spectrum = fft2_centered(torch.ones(size, size, dtype=torch.float64))
    expected = torch.zeros(size, size, dtype=torch.complex128)
    expected[centre, centre] = size * size
    assert torch.allclose(spectrum, expected, atol=1e-9)
    delta = torch.zeros(size, size, dtype=torch.float64)
    delta[centre, centre] = 1.0
    # A delta at the origin has a flat, phase-free spectrum.
    assert torch.allclose(fft2_centered(delta), torch.ones_like(spectrum), atol=1e-12)
    assert torch.allclose(fft3_centered(torch.ones(size, size, size))[centre, centre, centre].real,
                          torch.tensor(float(size**3)))


def test_spectrum_of_offset_delta_matches_frequency_grid():
    size = 16
    x0, y0 = 3.0, -2.0
    delta = torch.zeros(size, size, dtype=torch.float64)
    delta[size // 2 + int(y0), size // 2 + int(x0)] = 1.0
    k = frequency_grid_2d(size, dtype=torch.float64)
    phase = 2 * math.pi * (k[..., 0] * x0 + k[..., 1] * y0)
    assert torch.allclose(fft2_centered(delta), torch.polar(torch.ones_like(phase), -phase), atol=1e-12)
    # Hartley of the same delta is the cas kernel cos + sin.
    assert torch.allclose(hartley2(delta), torch.cos(phase) + torch.sin(phase), atol=1e-12)


def test_frequency_grids_are_ordered_x_y_z():
    k2 = frequency_grid_2d(8)
    assert k2.shape == (8, 8, 2)
    assert k2[4, 5].tolist() == [1 / 8, 0.0] and k2[3, 4].tolist() == [0.0, -1 / 8]
    k3 = frequency_grid_3d(8, dtype=torch.float64)
    assert k3.shape == (8, 8, 8, 3)
    assert k3[4, 4, 6].tolist() == [0.25, 0.0, 0.0] and k3[0, 4, 4].tolist() == [0.0, 0.0, -0.5]


def test_masks_and_soft_window():
    assert radial_frequency_px(8)[4, 7] == 3.0
    mask = circular_mask(16, 3.0)
    assert mask.dtype == torch.bool and int(mask.sum()) == 29  # lattice points with |n| <= 3
    assert torch.equal(real_space_disk_mask(16, 3.0), mask)
    window = soft_circular_window(32, 0.5, 1.0, dtype=torch.float64)
    assert window[16, 16 + 8] == 1.0 and window[16, 0] == 0.0 and window[0, 0] == 0.0
    assert torch.isclose(window[16, 16 + 12], torch.tensor(0.5, dtype=torch.float64))


def _band_limited_image(y, x, size):
    return (0.7 + torch.cos(2 * math.pi * (3 * x + 2 * y) / size + 0.3)
            + 0.5 * torch.cos(2 * math.pi * (-5 * x + y) / size))


def test_downsampling_a_band_limited_image_samples_it_on_the_coarse_grid():
    size, new_size = 32, 16
    fine = _band_limited_image(*_centred_xy(size), size)
    y, x = _centred_xy(new_size)
    coarse_expected = _band_limited_image(y * 2, x * 2, size)  # coarse pixel = 2 fine pixels
    coarse = downsample_images(fine[None], new_size)[0]
    assert torch.allclose(coarse, coarse_expected, atol=1e-12)
    assert torch.isclose(coarse.mean(), fine.mean())


def test_fourier_crop_keeps_dc_at_the_new_centre():
    spectrum = fft2_centered(torch.ones(3, 32, 32))
    cropped = fourier_crop2(spectrum, 15)
    assert cropped.shape == (3, 15, 15)
    assert torch.isclose(cropped[0, 7, 7].real, torch.tensor(1024.0))


def test_downsample_volume_matches_coarse_sampling_of_band_limited_volume():
    """A volume of low frequencies only, Fourier-cropped, equals the same function sampled coarsely."""
    def sample(size: int) -> torch.Tensor:
        grid = (torch.arange(size, dtype=torch.float64) - size // 2) / size
        z, y, x = torch.meshgrid(grid, grid, grid, indexing="ij")
        return 1.0 + torch.cos(2 * math.pi * 3 * x) * torch.sin(2 * math.pi * 2 * y + 0.3) + torch.cos(2 * math.pi * z)

    coarse = downsample_volume(sample(32), 16)
    assert torch.allclose(coarse, sample(16), atol=1e-10)


@pytest.mark.parametrize("sizes", [(32, 16), (30, 12), (31, 15), (32, 32)])
def test_downsample_images_equals_the_centred_fourier_crop_for_any_image(sizes):
    """The half-spectrum fast path (even sizes) gives the centred crop's result, Nyquist averaging included."""
    size, new_size = sizes
    images = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    centred = ifft2_centered(fourier_crop2(fft2_centered(images), new_size)).real * (new_size / size) ** 2
    assert torch.allclose(downsample_images(images, new_size), centred, atol=1e-12)
