"""Rotation helpers in numpy for the readers (the io layer does not import torch).

Matrices follow RELION (docs/conventions.md): ``A`` from Euler angles ``(rot, tilt, psi)`` in
degrees, ZYZ, as RELION's ``Euler_angles2matrix``; the inverse follows ``Euler_matrix2angles``.
"""

from __future__ import annotations

import numpy as np

# Below this |sin(tilt)| the rot and psi axes coincide (gimbal lock) and only rot + psi is defined.
_GIMBAL_LOCK_SIN_TILT = 16 * np.finfo(np.float32).eps


def euler_to_matrix(angles_degrees: np.ndarray) -> np.ndarray:
    """RELION rotation matrices from Euler angles.

    Args:
        angles_degrees: ``(N, 3)`` array of ``(rot, tilt, psi)`` in degrees.

    Returns:
        ``(N, 3, 3)`` float64 matrices ``A``.
    """
    a, b, g = np.deg2rad(np.asarray(angles_degrees, dtype=np.float64)).T
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return np.moveaxis(np.array(rows), -1, 0)


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """Euler angles of RELION rotation matrices, as RELION's ``Euler_matrix2angles`` chooses them.

    Tilt is in [0, 180]; at gimbal lock (tilt 0 or 180) rot is set to 0 and psi carries the
    whole in-plane angle.

    Args:
        matrices: ``(N, 3, 3)`` rotation matrices ``A``.

    Returns:
        ``(N, 3)`` float64 array of ``(rot, tilt, psi)`` in degrees.
    """
    m = np.asarray(matrices, dtype=np.float64)
    sin_tilt = np.hypot(m[:, 0, 2], m[:, 1, 2])
    regular = sin_tilt > _GIMBAL_LOCK_SIN_TILT
    tilt_up = m[:, 2, 2] > 0
    rot = np.where(regular, np.arctan2(m[:, 2, 1], m[:, 2, 0]), 0.0)
    tilt = np.where(regular, np.arctan2(sin_tilt, m[:, 2, 2]), np.where(tilt_up, 0.0, np.pi))
    psi_locked = np.where(tilt_up, np.arctan2(-m[:, 1, 0], m[:, 0, 0]), np.arctan2(m[:, 1, 0], -m[:, 0, 0]))
    psi = np.where(regular, np.arctan2(m[:, 1, 2], -m[:, 0, 2]), psi_locked)
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def axis_angle_to_matrix(vectors: np.ndarray) -> np.ndarray:
    """Rotation matrices ``expm([w]_x)`` of axis-angle vectors (Rodrigues' formula).

    Args:
        vectors: ``(N, 3)`` axis-angle vectors ``w``: unit axis times the angle in radians.

    Returns:
        ``(N, 3, 3)`` float64 rotation matrices.
    """
    w = np.asarray(vectors, dtype=np.float64)
    angle = np.linalg.norm(w, axis=-1)[:, None, None]
    zero = np.zeros(len(w))
    cross = np.stack([
        np.stack([zero, -w[:, 2], w[:, 1]], axis=-1),
        np.stack([w[:, 2], zero, -w[:, 0]], axis=-1),
        np.stack([-w[:, 1], w[:, 0], zero], axis=-1),
    ], axis=1)
    # sin(t)/t and (1 - cos(t))/t^2, written to stay exact as t -> 0.
    sinc = np.sinc(angle / np.pi)
    half_sinc = np.sinc(angle / (2 * np.pi))
    return np.eye(3) + sinc * cross + 0.5 * half_sinc**2 * (cross @ cross)
