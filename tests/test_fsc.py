"""Fourier shell correlation and the resolution read from it."""

import pytest
import torch

from cryofire.physics import fft3_centered, fourier_shell_correlation, ifft3_centered, resolution_at
from cryofire.physics.lattice import frequency_grid_3d

SIZE = 32
F64 = torch.float64


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(SIZE, SIZE, SIZE, dtype=F64, generator=torch.Generator().manual_seed(seed))


def test_identical_volumes_correlate_fully():
    volume = _noise(0)
    frequencies, fsc = fourier_shell_correlation(volume, volume)
    assert frequencies.shape == fsc.shape == (SIZE // 2,)
    assert frequencies[1] == 1 / SIZE
    assert torch.allclose(fsc, torch.ones_like(fsc))
    assert resolution_at(frequencies, fsc, 0.143) == 0.5


def test_independent_noise_correlates_near_zero():
    _, fsc = fourier_shell_correlation(_noise(1), _noise(2))
    shells = torch.round(frequency_grid_3d(SIZE, dtype=F64).norm(dim=-1) * SIZE).long().flatten()
    independent = torch.bincount(shells)[: SIZE // 2] / 2  # Hermitian pairs carry one sample
    assert torch.all(fsc[1:].abs() < 4 / independent[1:].sqrt())  # 4 standard deviations
    assert abs(float(fsc[3:].mean())) < 0.03


def test_copy_sharing_only_low_shells_crosses_at_the_cutoff():
    cutoff_shell = 8
    shells = torch.round(frequency_grid_3d(SIZE, dtype=F64).norm(dim=-1) * SIZE)
    shared = (shells <= cutoff_shell).to(F64)
    truth, other = _noise(3), _noise(4)
    copy = ifft3_centered(shared * fft3_centered(truth) + (1 - shared) * fft3_centered(other)).real
    frequencies, fsc = fourier_shell_correlation(truth, copy)
    assert torch.allclose(fsc[: cutoff_shell + 1], torch.ones(cutoff_shell + 1, dtype=F64))
    assert fsc[cutoff_shell + 1 :].abs().max() < 0.15
    # Linear interpolation between shell 8 (FSC 1) and shell 9 (FSC ~0) puts 0.5 near 8.5 / D.
    assert resolution_at(frequencies, fsc, 0.5) == pytest.approx(8.5 / SIZE, abs=0.1 / SIZE)


def test_resolution_interpolates_linearly():
    frequencies = torch.arange(5) / 10
    fsc = torch.tensor([1.0, 0.9, 0.7, 0.3, 0.1])
    assert resolution_at(frequencies, fsc, 0.5) == pytest.approx(0.25)
    assert resolution_at(frequencies, fsc, 0.05) == 0.5
    assert resolution_at(frequencies, fsc, 1.5) == 0.0
