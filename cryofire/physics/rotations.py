"""Rotation representations: RELION Euler angles, quaternions, S2S2 (two rows), axis-angle.

Every matrix is a RELION pose matrix ``A`` (docs/conventions.md): a point ``p`` of the volume
(x, y, z from the box centre) appears in the image at ``(A p)[:2]``. Angles are in degrees.
All functions are batched over leading axes and keep the dtype and device of their input.
"""

from __future__ import annotations

import math

import torch

# RELION's Euler_matrix2angles treats |sin(tilt)| below this as the gimbal case.
_GIMBAL_SIN_TILT = 16 * torch.finfo(torch.float32).eps


def euler_to_matrix(
    rot_deg: torch.Tensor, tilt_deg: torch.Tensor, psi_deg: torch.Tensor
) -> torch.Tensor:
    """RELION ``Euler_angles2matrix``: angles (...,) in degrees -> matrices (..., 3, 3)."""
    a, b, g = (torch.deg2rad(torch.as_tensor(x)) for x in (rot_deg, tilt_deg, psi_deg))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    rows = (
        (cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb),
        (-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb),
        (sb * ca, sb * sa, cb),
    )
    return torch.stack(
        [torch.stack(torch.broadcast_tensors(*row), dim=-1) for row in rows], dim=-2
    )


def matrix_to_euler(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RELION ``Euler_matrix2angles``: (..., 3, 3) -> (rot, tilt, psi), each (...,) in degrees.

    tilt is in [0, 180]; rot and psi in (-180, 180]. When sin(tilt) vanishes (tilt 0 or 180)
    only rot + psi (or psi - rot) is defined: rot is set to 0 and psi carries the whole angle.
    """
    m = matrices
    sin_tilt = torch.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = sin_tilt > _GIMBAL_SIN_TILT
    psi = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    rot = torch.atan2(m[..., 2, 1], m[..., 2, 0])
    tilt = torch.atan2(sin_tilt, m[..., 2, 2])
    upright = m[..., 2, 2] > 0
    psi_gimbal = torch.where(
        upright,
        torch.atan2(-m[..., 1, 0], m[..., 0, 0]),
        torch.atan2(m[..., 1, 0], -m[..., 0, 0]),
    )
    tilt_gimbal = torch.where(upright, torch.zeros_like(tilt), torch.full_like(tilt, math.pi))
    rot = torch.where(regular, rot, torch.zeros_like(rot))
    tilt = torch.where(regular, tilt, tilt_gimbal)
    psi = torch.where(regular, psi, psi_gimbal)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def quaternion_to_matrix(quaternions: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (..., 4) as (w, x, y, z) -> rotation matrices (..., 3, 3).

    The matrix rotates vectors actively: ``R v = q v q*``. Inputs are normalised first.
    """
    w, x, y, z = (quaternions / quaternions.norm(dim=-1, keepdim=True)).unbind(-1)
    rows = (
        (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)),
        (2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)),
        (2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def matrix_to_quaternion(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) (w, x, y, z) with w >= 0.

    Stable everywhere: each quaternion is computed from whichever of its four components is
    largest (Shepperd's method), so no division by a small number occurs.
    """
    m = matrices
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    d21, s21 = m[..., 2, 1] - m[..., 1, 2], m[..., 2, 1] + m[..., 1, 2]
    d02, s02 = m[..., 0, 2] - m[..., 2, 0], m[..., 0, 2] + m[..., 2, 0]
    d10, s10 = m[..., 1, 0] - m[..., 0, 1], m[..., 1, 0] + m[..., 0, 1]
    # 4 w^2, 4 x^2, 4 y^2, 4 z^2
    four_sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22),
        dim=-1,
    )
    # Candidate i is 4 * q_i * q computed from the formulas that divide by q_i.
    candidates = torch.stack(
        (
            torch.stack((four_sq[..., 0], d21, d02, d10), dim=-1),
            torch.stack((d21, four_sq[..., 1], s10, s02), dim=-1),
            torch.stack((d02, s10, four_sq[..., 2], s21), dim=-1),
            torch.stack((d10, s02, s21, four_sq[..., 3]), dim=-1),
        ),
        dim=-2,
    )
    best = four_sq.argmax(dim=-1)[..., None, None].expand(*four_sq.shape[:-1], 1, 4)
    chosen = torch.gather(candidates, -2, best).squeeze(-2)
    quaternions = chosen / chosen.norm(dim=-1, keepdim=True)
    return torch.where(quaternions[..., :1] < 0, -quaternions, quaternions)


def s2s2_to_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Six numbers (..., 6) -> rotation (..., 3, 3) by Gram-Schmidt.

    The rows of the result are ``e1 = v[:3] / |v[:3]|``, ``e2`` = the part of ``v[3:]``
    orthogonal to e1, normalised, and ``e3 = e1 x e2``.
    """
    e1 = torch.nn.functional.normalize(vectors[..., :3], dim=-1)
    second = vectors[..., 3:]
    e2 = torch.nn.functional.normalize(second - (e1 * second).sum(-1, keepdim=True) * e1, dim=-1)
    e3 = torch.linalg.cross(e1, e2, dim=-1)
    return torch.stack((e1, e2, e3), dim=-2)


def matrix_to_s2s2(matrices: torch.Tensor) -> torch.Tensor:
    """Rotation (..., 3, 3) -> its first two rows, concatenated (..., 6).

    The inverse of :func:`s2s2_to_matrix` on rotation matrices.
    """
    return matrices[..., :2, :].reshape(*matrices.shape[:-2], 6)


def _skew(vectors: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices [w]_x (..., 3, 3) of vectors (..., 3)."""
    x, y, z = vectors.unbind(-1)
    zero = torch.zeros_like(x)
    rows = ((zero, -z, y), (z, zero, -x), (-y, x, zero))
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues: ``expm([w]_x)`` for vectors w (..., 3) whose norm is the angle in radians.

    Returns (..., 3, 3); exact at w = 0 (series expansions below 1e-4 rad). Note that a cryoSPARC
    pose vector gives the RELION matrix as the *transpose* of this (docs/conventions.md).
    """
    angle_sq = (axis_angle * axis_angle).sum(-1)[..., None, None]
    small = angle_sq < 1e-8
    safe_sq = torch.where(small, torch.ones_like(angle_sq), angle_sq)
    safe_angle = safe_sq.sqrt()
    sin_term = torch.where(small, 1 - angle_sq / 6, torch.sin(safe_angle) / safe_angle)
    cos_term = torch.where(small, 0.5 - angle_sq / 24, (1 - torch.cos(safe_angle)) / safe_sq)
    skew = _skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin_term * skew + cos_term * (skew @ skew)


def geodesic_distance_deg(matrices_1: torch.Tensor, matrices_2: torch.Tensor) -> torch.Tensor:
    """Angle in degrees, in [0, 180], of the rotation ``R1^T R2`` for (..., 3, 3) inputs.

    Computed as atan2(|sin|, cos) from the antisymmetric part and the trace, which is accurate
    near 0 and 180 degrees and never leaves the domain of a trigonometric inverse.
    """
    relative = matrices_1.transpose(-1, -2) @ matrices_2
    cos_angle = (relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    antisym = relative - relative.transpose(-1, -2)
    sin_axis = torch.stack((antisym[..., 2, 1], antisym[..., 0, 2], antisym[..., 1, 0]), dim=-1)
    return torch.rad2deg(torch.atan2(sin_axis.norm(dim=-1) / 2, cos_angle))


def random_rotations(
    n: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` rotations (n, 3, 3) uniform on SO(3) (Haar), from normalised Gaussian quaternions.

    A ``generator`` must live on ``device``.
    """
    quaternions = torch.randn(n, 4, generator=generator, dtype=dtype, device=device)
    return quaternion_to_matrix(quaternions)
