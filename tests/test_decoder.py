"""HyperVolume: shapes and gradients, Friedel symmetry, float32 encoding under autocast, volume
rendering, and a fit to a known D=16 volume from its projections at known poses."""

from __future__ import annotations

import torch

from cryofire import physics
from cryofire.model import (
    DecoderConfig,
    HalfPlaneLattice,
    HyperVolume,
    fourier_mse,
    observed_spectrum,
    predict_spectrum,
)

BOX = 16


def small_decoder(zdim: int = 3, **overrides) -> HyperVolume:
    torch.manual_seed(0)
    return HyperVolume(BOX, DecoderConfig(zdim=zdim, width=64, num_features=32, **overrides))


def test_shapes_and_gradients() -> None:
    decoder = small_decoder()
    coords = (torch.rand(2, 3, 10, 3) - 0.5).requires_grad_()
    z = torch.randn(2, 3, 3, requires_grad=True)
    values = decoder(coords, z)
    assert values.shape == (2, 3, 10, 2) and values.dtype == torch.float32
    values.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    assert z.grad.abs().sum() > 0 and coords.grad.abs().sum() > 0
    assert not decoder.feature_positions_px.requires_grad


def test_friedel_symmetry_is_exact_and_z_matters() -> None:
    decoder = small_decoder()
    coords = torch.rand(1, 50, 3) - 0.5
    z = torch.randn(1, 3)
    values, mirrored = decoder(coords, z), decoder(-coords, z)
    assert torch.equal(mirrored[..., 0], values[..., 0])
    assert torch.equal(mirrored[..., 1], -values[..., 1])
    assert not torch.allclose(decoder(coords, z + 1.0), values)


def test_positional_encoding_stays_float32_under_bf16_autocast() -> None:
    decoder = small_decoder()
    coords = torch.rand(40, 3) - 0.5
    reference = decoder.encode_coordinates(coords)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = decoder.encode_coordinates(coords)
        values = decoder(coords[None], torch.randn(1, 3))
    assert encoded.dtype == torch.float32 and torch.equal(encoded, reference)
    assert values.dtype == torch.float32


def test_rendered_volume_has_the_decoder_spectrum() -> None:
    decoder = small_decoder()
    z = torch.randn(3)
    volume = decoder.render_volume(z)
    assert volume.shape == (BOX, BOX, BOX) and not volume.is_complex()
    spectrum = physics.fft3_centered(volume.double()) / BOX
    freqs = physics.frequency_grid_3d(BOX)
    # Points whose partner -k lies on the grid (no index 0) off the plane kz = 0, inside Nyquist.
    inner = freqs[1:, 1:, 1:]
    keep = (inner[..., 2] != 0) & (inner.norm(dim=-1) <= 0.5)
    expected = decoder(inner[keep][None], z[None])[0]
    got = spectrum[1:, 1:, 1:][keep]
    assert torch.allclose(torch.stack((got.real, got.imag), -1).float(), expected, atol=1e-4)
    outside = physics.frequency_grid_3d(BOX).norm(dim=-1) > 0.5 + 1e-6
    assert spectrum[outside].abs().max() < 1e-4


def test_rendering_at_another_size_keeps_densities() -> None:
    decoder = small_decoder()
    z = torch.randn(3)
    full, coarse, fine = (decoder.render_volume(z, size) for size in (BOX, BOX // 2, 2 * BOX))
    assert coarse.shape == (8, 8, 8) and fine.shape == (32, 32, 32)
    assert torch.allclose(coarse.mean(), full.mean(), atol=1e-5)
    assert torch.allclose(fine.mean(), full.mean(), atol=1e-5)


def three_blobs() -> torch.Tensor:
    """A mirror-asymmetric (D, D, D) volume of three Gaussian blobs, float64."""
    offsets = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    z, y, x = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    points = torch.stack((x, y, z), -1)
    volume = torch.zeros(BOX, BOX, BOX, dtype=torch.float64)
    blobs = [((3, 1, -2), 1.5, 1.0), ((-2, 2, 2), 1.2, 0.7), ((0, -3, 1), 1.3, 1.3)]
    for centre, sigma, weight in blobs:
        distance_sq = (points - torch.tensor(centre)).square().sum(-1)
        volume += weight * torch.exp(-distance_sq / (2 * sigma**2))
    return volume


def test_decoder_fitted_to_projections_at_known_poses_reaches_high_fsc() -> None:
    volume = three_blobs()
    rotations = physics.random_rotations(512, generator=torch.Generator().manual_seed(0))
    lattice = HalfPlaneLattice(BOX)
    count = lattice.count_within(BOX / 2)
    projections = physics.project_volume(volume, rotations.double()).float()
    observed = observed_spectrum(projections, lattice, count)
    coords, no_latent = lattice.coords[:count], torch.zeros(32, 1, 0)
    decoder = small_decoder(zdim=0, depth=1)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    batches = torch.randint(0, 512, (150, 32), generator=torch.Generator().manual_seed(1))
    for batch in batches:
        predicted = predict_spectrum(decoder, rotations[batch, None], no_latent, coords, None)
        loss = fourier_mse(predicted[:, 0], observed[batch]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fitted = decoder.render_volume(torch.zeros(0)).double()
    frequencies, fsc = physics.fourier_shell_correlation(fitted, volume)
    assert (fsc[frequencies < 0.33] > 0.8).all()
