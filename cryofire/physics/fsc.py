"""Fourier shell correlation between two volumes, and the resolution where it falls."""

from __future__ import annotations

import torch

from cryofire.physics.fft import fft3_centered
from cryofire.physics.lattice import frequency_grid_3d


def fourier_shell_correlation(
    volume_1: torch.Tensor, volume_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FSC of two real volumes (D, D, D) in shells of one lattice pixel.

    Shell ``n`` holds the samples with ``round(|k| * D) == n``, for n = 0 .. D//2 - 1.

    Returns:
        (frequencies, fsc): both (D//2,); frequencies ``n / D`` in cycles/px.
    """
    size = volume_1.shape[-1]
    ft_1, ft_2 = fft3_centered(volume_1), fft3_centered(volume_2)
    real_dtype = ft_1.real.dtype
    freqs = frequency_grid_3d(size, device=volume_1.device, dtype=torch.float64)
    shell = torch.round(freqs.norm(dim=-1) * size).long().flatten()
    keep = shell < size // 2
    shell = shell[keep]

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        totals = torch.zeros(size // 2, dtype=real_dtype, device=volume_1.device)
        return totals.index_add_(0, shell, values.flatten()[keep])

    cross = shell_sum((ft_1 * ft_2.conj()).real)
    power = shell_sum(ft_1.abs() ** 2) * shell_sum(ft_2.abs() ** 2)
    fsc = cross / power.sqrt().clamp_min(torch.finfo(real_dtype).tiny)
    frequencies = torch.arange(size // 2, device=volume_1.device, dtype=real_dtype) / size
    return frequencies, fsc


def resolution_at(frequencies: torch.Tensor, fsc: torch.Tensor, threshold: float) -> float:
    """Frequency (cycles/px) where ``fsc`` first drops below ``threshold``.

    Linear interpolation between the last shell above and the first below; 0.5 (Nyquist) when
    the curve never drops, the first frequency when it starts below.
    """
    below = (fsc < threshold).nonzero()
    if below.numel() == 0:
        return 0.5
    first = int(below[0])
    if first == 0:
        return float(frequencies[0])
    f_0, f_1 = float(frequencies[first - 1]), float(frequencies[first])
    c_0, c_1 = float(fsc[first - 1]), float(fsc[first])
    return f_0 + (c_0 - threshold) / (c_0 - c_1) * (f_1 - f_0)
