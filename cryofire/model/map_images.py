"""Images simulated from class maps: unlimited, labelled training images for the encoder.

An amortized encoder learns poses only from millions of images (bench/RESULTS.md, eighth session: 12° after 7.5
million on an H200, ~100° after the 128,000 a CPU affords), while a data set holds 10^4-10^6 images, each seen once
per epoch. Once the classical ab initio (:mod:`cryofire.model.ab_initio`) has class maps, fresh images can be drawn
from them at every step: uniform random rotations, the classes in the data's proportions, the data's CTFs and
shifts, and Gaussian noise with the data's radial noise spectrum (the residual power at the ab initio's poses). Real
held-out images then score like the simulated ones (same benchmark). The images are raw, like the data loader's:
the model windows them.

Units and conventions as in :mod:`cryofire.model.em_init`: maps are centred Fourier grids of side
``G = PADDING * D`` in the units of ``observed_spectrum`` (scaled by 1 / D), rotations RELION matrices (the slice of
an image is the map at ``A^T (kx, ky, 0)``), shifts re-centring shifts in px (the particle sits at minus the shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryofire.model.em_init import StochasticEM
from cryofire.model.em_refine import reconstruct, residual_power
from cryofire.model.trilinear import sample_slices
from cryofire.physics import ifft2_centered, random_rotations
from cryofire.physics.ctf import ctf_from_parameters
from cryofire.physics.lattice import frequency_grid_2d


@dataclass
class LabelledImages:
    """Simulated images and the truth they were drawn from."""

    images: torch.Tensor  # (B, D, D) raw real-space images
    rotations: torch.Tensor  # (B, 3, 3) RELION matrices
    shifts_px: torch.Tensor  # (B, 2) re-centring shifts, px
    ctf_parameters: torch.Tensor  # (B, 9) CTF parameter rows
    classes: torch.Tensor  # (B,) class indices


class MapImageSimulator:
    """Noisy images (B, D, D) of K class maps, with the data's CTFs, shifts, class proportions and noise spectrum.

    Args:
        volume_ft: (K, G, G, G) complex class maps (centred Fourier grids, ``G = PADDING * D``).
        box_size: D, px.
        noise_power: (D // 2 + 1,) noise variance of one spectrum coefficient of a WINDOWED image in each radius
            shell (``observed_spectrum`` units), e.g. :func:`cryofire.model.em_refine.residual_power`.
        window_power: mean square of the model's real-space window: the raw images' noise is
            ``noise_power / window_power`` so that, once windowed, it has ``noise_power``.
        ctf_parameters: (N, 9) CTF parameter rows of the data (``ctf_from_parameters``), drawn from.
        shifts_px: (N, 2) shifts of the data, px, drawn from.
        class_fractions: (K,) how often each class is drawn.
    """

    def __init__(self, volume_ft: torch.Tensor, box_size: int, noise_power: torch.Tensor, window_power: float,
                 ctf_parameters: torch.Tensor, shifts_px: torch.Tensor, class_fractions: torch.Tensor) -> None:
        device = volume_ft.device
        self.size, self.grid_size = box_size, volume_ft.shape[-1]
        self.channels = torch.view_as_real(volume_ft).permute(0, 4, 1, 2, 3).contiguous()  # (K, 2, G, G, G)
        self.frequencies = frequency_grid_2d(box_size, device=device).reshape(-1, 2).float()  # (D*D, 2) cycles/px
        shell = (self.frequencies.norm(dim=-1) * box_size).round().long().clamp_max(box_size // 2)
        amplitude = (noise_power.to(device).clamp_min(0.0) / window_power).sqrt()[shell]
        self.noise_amplitude = amplitude.reshape(box_size, box_size)
        self.ctf_parameters, self.shifts_px = ctf_parameters.to(device), shifts_px.float().to(device)
        self.class_fractions = class_fractions.double().cpu()

    @property
    def device(self) -> torch.device:
        return self.channels.device

    def images(self, rotations: torch.Tensor, shifts_px: torch.Tensor, ctf_parameters: torch.Tensor,
               classes: torch.Tensor, generator: torch.Generator | None = None, noise_scale: float = 1.0
               ) -> torch.Tensor:
        """Raw images (B, D, D) of the class maps at rotations (B, 3, 3), shifts (B, 2) px, CTFs (B, 9) and classes
        (B,); with noise drawn from ``generator`` (a CPU generator) at ``noise_scale`` times the data's amplitude,
        noiseless when it is None."""
        size, count = self.size, self.frequencies.shape[0]
        points = (self.frequencies * self.grid_size) @ rotations[:, :2, :].float()  # (B, D*D, 3): A^T (kx, ky, 0)
        values = torch.zeros(len(rotations), count, 2, device=self.device)
        for k in range(len(self.channels)):
            mine = classes == k
            values[mine] = sample_slices(self.channels[k], points[mine])
        ctf = ctf_from_parameters(ctf_parameters, size).reshape(len(rotations), count)
        phase = (2 * math.pi) * (shifts_px.float() @ self.frequencies.T)  # the particle sits at -shift
        spectra = torch.view_as_complex(values) * ctf * torch.polar(torch.ones_like(phase), phase)
        spectra = spectra.reshape(-1, size, size) * size  # observed_spectrum is scaled by 1 / D
        if generator is not None:
            # complex white noise: its real image keeps the Hermitian part, half its power, i.e. noise_amplitude^2
            white = torch.randn(len(rotations), size, size, 2, generator=generator).to(self.device)
            spectra = spectra + torch.view_as_complex(white) * (self.noise_amplitude * (size * noise_scale))
        return ifft2_centered(spectra).real

    def draw(self, batch: int, generator: torch.Generator, noise_scale: float = 1.0) -> LabelledImages:
        """``batch`` images at uniform random rotations, with the data's shifts and CTFs (random images') and the
        classes in ``class_fractions``; all randomness from ``generator`` (a CPU generator)."""
        rotations = random_rotations(batch, generator=generator).float().to(self.device)
        classes = torch.multinomial(self.class_fractions, batch, replacement=True, generator=generator)
        rows = torch.randint(0, len(self.shifts_px), (2, batch), generator=generator)
        shifts, ctf_parameters = self.shifts_px[rows[0].to(self.device)], self.ctf_parameters[rows[1].to(self.device)]
        classes = classes.to(self.device)
        images = self.images(rotations, shifts, ctf_parameters, classes, generator, noise_scale)
        return LabelledImages(images, rotations, shifts, ctf_parameters, classes)


def simulator_from_assignment(em: StochasticEM, observed: torch.Tensor, ctf: torch.Tensor, rotations: torch.Tensor,
                              shifts_px: torch.Tensor, classes: torch.Tensor, ctf_parameters: torch.Tensor,
                              window_power: float) -> MapImageSimulator:
    """A simulator from images with known (or inferred) poses: ``em``'s class maps rebuilt to Nyquist from the
    spectra (N, M, 2) (M points covering D / 2, of windowed images) with CTF (N, M) at rotations (N, 3, 3), shifts
    (N, 2) px and classes (N,); the noise spectrum from their residuals; CTFs (N, 9), shifts and class proportions
    from these images. ``window_power``: mean square of the window the spectra were taken through."""
    reconstruct(em, observed, ctf, rotations, shifts_px, classes, em.size / 2)
    noise_power = residual_power(em, observed, ctf, rotations, shifts_px, classes)
    fractions = torch.bincount(classes.cpu(), minlength=em.config.classes)
    return MapImageSimulator(em.volume_ft, em.size, noise_power, window_power, ctf_parameters, shifts_px, fractions)
