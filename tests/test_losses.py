"""Losses: the Fourier error against Hartley, winner-takes-all, the mirror mapping pinned with
physics.project_volume, and the KL sign."""

from __future__ import annotations

import torch

from cryofire import physics
from cryofire.model import (
    HalfPlaneLattice,
    best_hypothesis,
    fourier_mse,
    kl_divergence,
    mirror_images,
    mirror_poses,
    observed_spectrum,
)

BOX = 24


def asymmetric_volume() -> torch.Tensor:
    """Three Gaussian blobs of different sizes (no mirror symmetry), (D, D, D) float64."""
    offsets = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    points = torch.stack((x, y, z), -1)
    blobs = [((4, 1, -2), 2.0, 1.0), ((-3, 3, 2), 1.5, 0.7), ((0, -4, 1), 1.8, 1.3)]
    volume = torch.zeros(BOX, BOX, BOX, dtype=torch.float64)
    for centre, sigma, weight in blobs:
        distance_sq = (points - torch.tensor(centre)).square().sum(-1)
        volume += weight * torch.exp(-distance_sq / (2 * sigma**2))
    return volume


def shifted(images: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Move image content by +shift_px (B, 2)."""
    spectra = physics.phase_shift_2d(physics.fft2_centered(images), shift_px)
    return physics.ifft2_centered(spectra).real


def random_rotations(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return physics.random_rotations(count, generator=generator, dtype=torch.float64)


def test_mirror_images_reflects_about_the_box_centre() -> None:
    image = torch.zeros(1, 8, 8)
    image[0, 2, 4 + 3] = 1.0  # x offset +3 from the centre column 4
    mirrored = mirror_images(image)
    assert mirrored[0, 2, 4 - 3] == 1.0 and mirrored.sum() == 1.0
    odd = torch.randn(2, 7, 7)
    assert torch.equal(mirror_images(mirror_images(odd)), odd)
    assert torch.equal(mirror_images(odd)[..., 3], odd[..., 3])


def test_mirror_of_a_projection_is_the_projection_at_the_mapped_pose() -> None:
    volume = asymmetric_volume()
    rotations = random_rotations(5, seed=0)
    projections = physics.project_volume(volume, rotations)
    mirror_r, _ = mirror_poses(rotations, torch.zeros(5, 2, dtype=torch.float64))
    # Column 0 (x = -D/2) has no mirror partner inside the box and is left out.
    error = (mirror_images(projections) - physics.project_volume(volume, mirror_r))[..., 1:]
    assert error.abs().max() < 1e-6 * projections.abs().max()


def test_mirror_of_a_shifted_projection_needs_the_mapped_shift() -> None:
    volume = asymmetric_volume()
    rotations = random_rotations(4, seed=1)
    shifts = torch.tensor([[1.5, -2.0], [-1.0, 0.5], [2.0, 2.0], [0.3, -0.7]], dtype=torch.float64)
    images = shifted(physics.project_volume(volume, rotations), -shifts)  # at centre - shift
    mirror_r, mirror_t = mirror_poses(rotations, shifts)
    mirrored = mirror_images(images)[..., 1:]
    scale = images.abs().max()
    # Fractional Fourier shifts treat the unpaired Nyquist column asymmetrically: 1 % tolerance.
    mapped = shifted(physics.project_volume(volume, mirror_r), -mirror_t)[..., 1:]
    assert (mirrored - mapped).abs().max() < 0.01 * scale
    unmapped = shifted(physics.project_volume(volume, mirror_r), -shifts)[..., 1:]
    assert (mirrored - unmapped).abs().max() > 0.1 * scale


def test_mirror_poses_gives_rotations_and_is_an_involution() -> None:
    rotations = physics.random_rotations(6)
    shifts = torch.randn(6, 2)
    mirror_r, mirror_t = mirror_poses(rotations, shifts)
    assert torch.allclose(torch.linalg.det(mirror_r), torch.ones(6), atol=1e-5)
    identity = torch.eye(3).expand(6, 3, 3)
    assert torch.allclose(mirror_r @ mirror_r.transpose(-1, -2), identity, atol=1e-5)
    back_r, back_t = mirror_poses(mirror_r, mirror_t)
    assert torch.equal(back_r, rotations) and torch.equal(back_t, shifts)


def test_fourier_mse_on_the_half_plane_equals_hartley_mse_on_the_disk() -> None:
    images_a, images_b = torch.randn(2, 3, BOX, BOX)
    lattice = HalfPlaneLattice(BOX)
    count = lattice.count_within(9.0)
    spectra_a, spectra_b = (observed_spectrum(x, lattice, count) for x in (images_a, images_b))
    half = fourier_mse(spectra_a, spectra_b)
    disk = physics.circular_mask(BOX, 9.0)
    disk[BOX // 2, BOX // 2] = False
    hartley_error = (physics.hartley2(images_a) - physics.hartley2(images_b)) / BOX
    assert 2 * count == int(disk.sum())
    assert torch.allclose(half, hartley_error[:, disk].square().mean(-1), rtol=1e-4)


def test_best_hypothesis_keeps_each_images_minimum() -> None:
    losses = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 0.7]])
    minimum, winner = best_hypothesis(losses)
    assert minimum.tolist() == [1.0, 0.5] and winner.tolist() == [1, 0]


def test_kl_is_positive_and_matches_torch_distributions() -> None:
    mean, logvar = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2))
    posterior = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    assert torch.allclose(kl_divergence(mean, logvar), expected, atol=1e-5)
    assert (kl_divergence(mean, logvar) > 0).all()
