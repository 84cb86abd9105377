"""RELION Euler matrices and the other rotation representations."""

import math

import pytest
import torch

from cryofire.physics import (
    axis_angle_to_matrix,
    euler_to_matrix,
    geodesic_distance_deg,
    matrix_to_euler,
    matrix_to_quaternion,
    matrix_to_s2s2,
    quaternion_to_matrix,
    random_rotations,
    s2s2_to_matrix,
)

F64 = torch.float64


def _t(*values):
    return torch.tensor(values, dtype=F64)


def _assert_rotation(matrices):
    eye = torch.eye(3, dtype=matrices.dtype).expand_as(matrices)
    assert torch.allclose(matrices.transpose(-1, -2) @ matrices, eye, atol=1e-6)
    ones = torch.ones(matrices.shape[:-2], dtype=matrices.dtype)
    assert torch.allclose(torch.linalg.det(matrices), ones, atol=1e-6)


@pytest.mark.parametrize(
    "angles, expected",
    [
        # From the RELION formula with a = rot, b = tilt, g = psi (docs/conventions.md).
        ((90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
        ((0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]]),
        ((0, 0, 90), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]),
        ((90, 90, 0), [[0, 0, -1], [-1, 0, 0], [0, 1, 0]]),
        ((0, 90, 90), [[0, 1, 0], [0, 0, 1], [1, 0, 0]]),
    ],
)
def test_relion_matrix_for_specific_angles(angles, expected):
    matrix = euler_to_matrix(*(_t(a) for a in angles))
    assert torch.allclose(matrix, torch.tensor(expected, dtype=F64), atol=1e-12)


def test_euler_round_trip_random_angles():
    g = torch.Generator().manual_seed(0)
    rot = torch.rand(500, generator=g, dtype=F64) * 360 - 180
    tilt = torch.rand(500, generator=g, dtype=F64) * 178 + 1
    psi = torch.rand(500, generator=g, dtype=F64) * 360 - 180
    matrices = euler_to_matrix(rot, tilt, psi)
    _assert_rotation(matrices)
    rot2, tilt2, psi2 = matrix_to_euler(matrices)
    assert torch.allclose(rot2, rot, atol=1e-8)
    assert torch.allclose(tilt2, tilt, atol=1e-8)
    assert torch.allclose(psi2, psi, atol=1e-8)


def test_euler_gimbal_cases_put_the_angle_in_psi():
    rot, tilt, psi = matrix_to_euler(euler_to_matrix(_t(30, 30), _t(0, 180), _t(40, 40)))
    assert torch.allclose(rot, _t(0, 0)) and torch.allclose(tilt, _t(0, 180))
    assert torch.allclose(psi, _t(70, 10))  # psi + rot at tilt 0, psi - rot at tilt 180
    again = euler_to_matrix(rot, tilt, psi)
    assert torch.allclose(again, euler_to_matrix(_t(30, 30), _t(0, 180), _t(40, 40)), atol=1e-12)


def test_float32_matrices_round_trip_through_euler():
    matrices = random_rotations(200, generator=torch.Generator().manual_seed(1))
    assert matrices.dtype == torch.float32
    again = euler_to_matrix(*matrix_to_euler(matrices))
    assert torch.allclose(again, matrices, atol=1e-5)


def test_quaternion_round_trip_including_half_turns():
    g = torch.Generator().manual_seed(2)
    axes = torch.nn.functional.normalize(torch.randn(300, 3, generator=g, dtype=F64), dim=-1)
    generic = torch.rand(200, dtype=F64, generator=g) * math.pi
    angles = torch.cat([generic, torch.full((100,), math.pi - 1e-9, dtype=F64)])
    matrices = axis_angle_to_matrix(axes * angles[:, None])
    quaternions = matrix_to_quaternion(matrices)
    assert torch.all(quaternions[:, 0] >= 0)
    assert torch.allclose(quaternion_to_matrix(quaternions), matrices, atol=1e-10)
    expected = torch.cat([torch.cos(angles / 2)[:, None], torch.sin(angles / 2)[:, None] * axes], dim=-1)
    assert torch.allclose(quaternions, expected, atol=1e-8)


def test_axis_angle_is_active_rodrigues_and_safe_at_zero():
    quarter_turn_z = axis_angle_to_matrix(_t(0, 0, math.pi / 2))
    expected = torch.tensor([[0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=F64)
    assert torch.allclose(quarter_turn_z, expected, atol=1e-12)
    zero = torch.zeros(3, dtype=F64, requires_grad=True)
    identity = axis_angle_to_matrix(zero)
    assert torch.equal(identity, torch.eye(3, dtype=F64))
    identity.sum().backward()
    assert torch.isfinite(zero.grad).all()
    w = _t(1e-6, -2e-6, 3e-6)
    assert torch.allclose(axis_angle_to_matrix(w), torch.linalg.matrix_exp(torch.tensor(
        [[0, -3e-6, -2e-6], [3e-6, 0, -1e-6], [2e-6, 1e-6, 0]], dtype=F64)), atol=1e-15)


def test_s2s2_gram_schmidt_and_round_trip():
    v = _t(2, 0, 0, 1, 3, 0)
    matrix = s2s2_to_matrix(v)
    assert torch.allclose(matrix, torch.eye(3, dtype=F64))
    matrices = random_rotations(50, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.allclose(s2s2_to_matrix(matrix_to_s2s2(matrices)), matrices, atol=1e-12)
    _assert_rotation(s2s2_to_matrix(torch.randn(50, 6, dtype=F64)))


@pytest.mark.parametrize("angle_deg", [37.0, 1e-4, 179.9])
def test_geodesic_distance_of_a_known_axis_rotation(angle_deg):
    base = random_rotations(10, generator=torch.Generator().manual_seed(4), dtype=F64)
    axis = torch.nn.functional.normalize(_t(1, -2, 0.5), dim=-1)
    step = axis_angle_to_matrix(axis * math.radians(angle_deg))
    distance = geodesic_distance_deg(base, base @ step)
    assert torch.allclose(distance, torch.full((10,), angle_deg, dtype=F64), rtol=1e-6, atol=1e-9)


def test_random_rotations_are_uniform():
    matrices = random_rotations(20000, generator=torch.Generator().manual_seed(5), dtype=F64)
    _assert_rotation(matrices)
    assert matrices.mean(0).abs().max() < 0.02
    cos_tilt = matrices[:, 2, 2]  # z component of the viewing direction
    assert abs(float(cos_tilt.mean())) < 0.015
    assert abs(float(cos_tilt.var()) - 1 / 3) < 0.01
