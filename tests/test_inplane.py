"""In-plane image rotation about the box centre: analytic blob positions, the pose it stands for (a projection
at ``Rz(a) @ A`` is the projection at A turned by a; RELION's psi falls by a), and exact quarter turns."""

import math

import torch

from cryofire.physics import (
    euler_to_matrix,
    inplane_rotation_matrix,
    matrix_to_euler,
    project_volume,
    random_rotations,
    rotate_images,
)

F64 = torch.float64
SIZE = 32


def _offsets() -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(SIZE, dtype=F64) - SIZE // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def _blob_2d(x0: float, y0: float, sigma: float = 2.5) -> torch.Tensor:
    x, y = _offsets()
    return torch.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    x, y = _offsets()
    return float((image * x).sum() / image.sum()), float((image * y).sum() / image.sum())


def test_a_blob_moves_counter_clockwise_about_the_box_centre() -> None:
    blob = _blob_2d(5.0, 0.0)[None]
    for angle in (90.0, 30.0, -120.0):
        turned = rotate_images(blob, torch.tensor([angle], dtype=F64))[0]
        x, y = _centroid(turned)
        expected = (5.0 * math.cos(math.radians(angle)), 5.0 * math.sin(math.radians(angle)))
        assert math.hypot(x - expected[0], y - expected[1]) < 0.02
        # bilinear interpolation errs by at most ~(|f_xx| + |f_yy|) / 8 = 1 / (4 sigma^2) = 0.04 of the peak
        assert torch.allclose(turned, _blob_2d(*expected), atol=0.04)


def test_quarter_turns_permute_pixels_exactly() -> None:
    image = torch.randn(1, SIZE, SIZE, dtype=F64) * (_offsets()[0].hypot(_offsets()[1]) < SIZE // 2 - 1)
    quarter = rotate_images(image, torch.tensor([90.0], dtype=F64))
    expected, centre = torch.zeros_like(image), SIZE // 2
    for column in range(1, SIZE):  # (x, y) -> (-y, x): output [i, j] reads input [2 c - j, i]
        expected[0, :, column] = image[0, 2 * centre - column, :]
    assert torch.allclose(quarter, expected, atol=1e-12)
    full = rotate_images(rotate_images(quarter, torch.tensor([90.0], dtype=F64)), torch.tensor([180.0], dtype=F64))
    assert torch.allclose(full, image, atol=1e-12)


def test_turned_projection_is_the_projection_at_the_turned_pose() -> None:
    c = torch.arange(SIZE, dtype=F64) - SIZE // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    volume = (torch.exp(-((x - 4) ** 2 + (y + 2) ** 2 + (z - 1) ** 2) / 18)
              + 0.5 * torch.exp(-((x + 3) ** 2 + y**2 + z**2) / 18))
    poses = random_rotations(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    angles = torch.tensor([37.0, -100.0, 160.0], dtype=F64)
    turned = rotate_images(project_volume(volume, poses), angles)
    expected = project_volume(volume, inplane_rotation_matrix(angles) @ poses)
    inside = _offsets()[0].hypot(_offsets()[1]) < SIZE // 2 - 1  # the corners turn in from outside the box
    # bilinear turn (1 / (4 sigma^2) = 0.028 of the peak for sigma 3) + the projection's ~1 %
    assert ((turned - expected) * inside).abs().max() < 0.04 * expected.abs().max()


def test_an_inplane_turn_lowers_relion_psi() -> None:
    rot, tilt, psi = torch.tensor([20.0, 70.0, -40.0], dtype=F64).unbind()
    turned = inplane_rotation_matrix(torch.tensor(25.0, dtype=F64)) @ euler_to_matrix(rot, tilt, psi)
    assert torch.allclose(torch.stack(matrix_to_euler(turned)), torch.stack((rot, tilt, psi - 25.0)), atol=1e-9)
