"""Projection by Fourier slicing, and reconstruction by Fourier insertion."""

import math

import pytest
import torch

from cryofire.physics import (
    Backprojector,
    backproject_ft,
    ctf_for_images,
    euler_to_matrix,
    fft2_centered,
    fft3_centered,
    fourier_shell_correlation,
    hartley2,
    hartley3,
    ifft2_centered,
    project_volume,
    random_rotations,
    resolution_at,
    slice_volume_ft,
)

F64 = torch.float64
SIZE = 32
SIGMA = 2.0


def _grid(ndim: int, dtype=F64) -> list[torch.Tensor]:
    c = torch.arange(SIZE, dtype=dtype) - SIZE // 2
    return torch.meshgrid(*([c] * ndim), indexing="ij")


def _gaussian_3d(p: torch.Tensor) -> torch.Tensor:
    z, y, x = _grid(3)
    return torch.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * SIGMA**2))


def _gaussian_projection(q: torch.Tensor) -> torch.Tensor:
    """Line integral of the 3D Gaussian: a 2D Gaussian of the same sigma centred at q."""
    y, x = _grid(2)
    r_sq = (x - q[0]) ** 2 + (y - q[1]) ** 2
    return math.sqrt(2 * math.pi) * SIGMA * torch.exp(-r_sq / (2 * SIGMA**2))


def _smooth_volume(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(12, 3, generator=g) - 0.5) * 14
    z, y, x = _grid(3, torch.float32)
    r_sq = [(x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 for p in centres]
    blobs = [torch.exp(-r / (2 * 1.2**2)) for r in r_sq]
    return torch.stack(blobs).sum(0)


def test_projection_of_a_gaussian_is_the_analytic_gaussian_at_a_p():
    p = torch.tensor([3.0, -2.0, 2.5], dtype=F64)
    angles = torch.tensor([[30.0, 60.0, -20.0], [-120.0, 150.0, 75.0], [200.0, 35.0, 110.0]], dtype=F64)
    poses = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    projections = project_volume(_gaussian_3d(p), poses)
    for pose, image in zip(poses, projections):
        expected = _gaussian_projection((pose @ p)[:2])
        assert (image - expected).abs().max() / expected.max() < 0.02
        assert float(image.sum()) == pytest.approx((2 * math.pi) ** 1.5 * SIGMA**3, rel=0.01)


def test_psi_rotates_the_image_clockwise_about_the_box_centre():
    p = torch.tensor([5.0, 0.0, 1.0], dtype=F64)
    zeros = torch.zeros(2, dtype=F64)
    poses = euler_to_matrix(zeros, zeros, torch.tensor([0.0, 90.0], dtype=F64))
    upright, turned = project_volume(_gaussian_3d(p).float(), poses.float())
    # A p for psi = 90 maps (x, y) to (y, -x): the blob at x = +5 appears at y = -5.
    peak_row, peak_col = divmod(int(turned.argmax()), SIZE)
    assert (peak_row - SIZE // 2, peak_col - SIZE // 2) == (-5, 0)
    negate = (2 * (SIZE // 2) - torch.arange(SIZE)) % SIZE
    assert torch.allclose(turned, upright[:, negate].T, atol=1e-4)  # turned[y, x] = upright[x, -y]


def test_identity_slice_is_the_fourier_slice_theorem():
    volume = torch.randn(SIZE, SIZE, SIZE, dtype=F64, generator=torch.Generator().manual_seed(0))
    identity = torch.eye(3, dtype=F64)[None]
    central = slice_volume_ft(fft3_centered(volume), identity)[0]
    assert torch.allclose(central, fft2_centered(volume.sum(0)), atol=1e-9)
    assert torch.allclose(ifft2_centered(central).real, volume.sum(0), atol=1e-9)
    hartley_slice = slice_volume_ft(hartley3(volume), identity)[0]
    assert torch.allclose(hartley_slice, hartley2(volume.sum(0)), atol=1e-9)


def test_one_volume_per_pose_matches_a_shared_volume():
    volume_ft = fft3_centered(_smooth_volume(1))
    poses = random_rotations(3, generator=torch.Generator().manual_seed(1))
    shared = slice_volume_ft(volume_ft, poses)
    per_pose = slice_volume_ft(volume_ft.expand(3, -1, -1, -1), poses)
    assert torch.allclose(per_pose, shared, atol=1e-3)


def test_backproject_identity_fills_the_central_plane_with_ctf_weights():
    images_ft = fft2_centered(torch.randn(1, 8, 8, dtype=F64))
    volume_sum = torch.zeros(8, 8, 8, dtype=torch.complex128)
    weight_sum = torch.zeros(8, 8, 8, dtype=F64)
    ctf = torch.full((1, 8, 8), 2.0, dtype=F64)
    backproject_ft(images_ft, torch.eye(3, dtype=F64)[None], ctf, volume_sum, weight_sum)
    assert torch.allclose(volume_sum[4], 2 * images_ft[0]) and torch.all(weight_sum[4] == 4.0)
    assert volume_sum[torch.arange(8) != 4].abs().max() == 0 and weight_sum.sum() == 4.0 * 64


def test_reconstruction_from_many_clean_projections_reaches_nyquist():
    volume = _smooth_volume(2)
    poses = random_rotations(500, generator=torch.Generator().manual_seed(2))
    backprojector = Backprojector(SIZE, oversampling=2)
    for start in range(0, 500, 250):
        chunk = slice(start, start + 250)
        backprojector.insert(project_volume(volume, poses[chunk]), poses[chunk])
    reconstruction = backprojector.reconstruct(wiener_constant=0.01)
    frequencies, fsc = fourier_shell_correlation(reconstruction, volume)
    assert fsc.min() > 0.9
    assert resolution_at(frequencies, fsc, 0.5) == 0.5
    assert (reconstruction - volume).norm() / volume.norm() < 0.05


def test_reconstruction_corrects_the_ctf():
    volume = _smooth_volume(3)
    poses = random_rotations(400, generator=torch.Generator().manual_seed(3))
    defocus = torch.linspace(5000.0, 15000.0, 400)
    ctf_params = dict(defocus_u_angstrom=defocus, defocus_v_angstrom=defocus, defocus_angle_deg=0.0,
                      voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    ctf_small = ctf_for_images(SIZE, 3.0, **ctf_params)
    images = ifft2_centered(ctf_small * fft2_centered(project_volume(volume, poses))).real
    backprojector = Backprojector(SIZE, oversampling=2)
    backprojector.insert(images, poses, ctf_for_images(backprojector.padded_size, 3.0, **ctf_params))
    frequencies, fsc = fourier_shell_correlation(backprojector.reconstruct(wiener_constant=0.1), volume)
    assert fsc.min() > 0.7  # without the CTF in insert() it falls below -0.5 by 0.25 cycles/px
