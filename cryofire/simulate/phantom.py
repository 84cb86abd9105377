"""A built-in pseudo-atomic molecule with a hinge, for simulated datasets with known ground truth.

The molecule is about 110 Å across and made of Gaussian pseudo-atoms in three domains:
- a *body*: an asymmetric bundle of four rods of different lengths plus a globular lobe;
- an *arm*: two rods and a globular head, attached to the body at a hinge;
- a *knob*: a small off-axis globule that breaks every symmetry (so the hand is defined).
Moving the arm about the hinge axis gives the conformational coordinate: two hinge angles make a discrete
(bimodal) heterogeneity, a distribution of angles a continuous one.

Coordinates are (x, y, z) in Å from the box centre. Nothing here depends on torch; rendering lives in
:mod:`cryofire.simulate.render`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ATOM_SPACING_ANGSTROM = 3.0
_LAYOUT_SEED = 20231127  # fixes the globules' random atom placement: the molecule is the same everywhere


@dataclass(frozen=True)
class Phantom:
    """Pseudo-atoms of the rest state and the hinge that moves the arm.

    Attributes:
        atoms_angstrom: (N, 3) atom centres (x, y, z) in Å, rest state (hinge angle 0).
        weights: (N,) relative scattering weight of each atom.
        moving: (N,) True for atoms of the arm, which turn about the hinge.
        hinge_point_angstrom: (3,) a point on the hinge axis, Å.
        hinge_axis: (3,) unit vector of the hinge axis.
    """

    atoms_angstrom: np.ndarray
    weights: np.ndarray
    moving: np.ndarray
    hinge_point_angstrom: np.ndarray
    hinge_axis: np.ndarray

    @property
    def n_atoms(self) -> int:
        return len(self.atoms_angstrom)


def _rod(start: tuple[float, float, float], end: tuple[float, float, float]) -> np.ndarray:
    """Atoms every ATOM_SPACING_ANGSTROM along a straight segment, (n, 3) Å."""
    start_v, end_v = np.asarray(start, float), np.asarray(end, float)
    n = max(2, int(np.linalg.norm(end_v - start_v) / ATOM_SPACING_ANGSTROM) + 1)
    return np.linspace(start_v, end_v, n)


def _globule(
    centre: tuple[float, float, float], radii_angstrom: tuple[float, float, float], n: int, rng: np.random.Generator
) -> np.ndarray:
    """n atoms uniformly inside an ellipsoid, (n, 3) Å."""
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radial = rng.uniform(size=(n, 1)) ** (1.0 / 3.0)
    return np.asarray(centre) + directions * radial * np.asarray(radii_angstrom)


def build_phantom() -> Phantom:
    """The built-in hinged molecule (deterministic)."""
    rng = np.random.default_rng(_LAYOUT_SEED)
    body = [
        _rod((-30, -12, -6), (22, -12, -6)),
        _rod((-26, -2, 4), (18, -2, 4)),
        _rod((-34, 8, -4), (12, 8, -4)),
        _rod((-20, -4, -16), (10, -4, -16)),
        _globule((-30, 0, 8), (12, 10, 9), 45, rng),
    ]
    arm = [
        _rod((26, -8, 0), (26, 30, 6)),
        _rod((34, -4, -6), (32, 28, -2)),
        _globule((30, 40, 2), (11, 9, 10), 40, rng),
    ]
    knob = [_globule((-6, 4, 22), (7, 6, 6), 18, rng)]
    body_atoms = np.concatenate(body + knob)
    arm_atoms = np.concatenate(arm)
    atoms = np.concatenate([body_atoms, arm_atoms])
    centre = atoms.mean(axis=0)
    atoms = atoms - centre
    moving = np.concatenate([np.zeros(len(body_atoms), bool), np.ones(len(arm_atoms), bool)])
    weights = np.ones(len(atoms))
    hinge_point = np.array([26.0, -10.0, 0.0]) - centre
    hinge_axis = np.array([0.0, 0.3, 1.0]) / np.linalg.norm([0.0, 0.3, 1.0])
    return Phantom(atoms, weights, moving, hinge_point, hinge_axis)


def axis_rotation(axis: np.ndarray, angles_deg: np.ndarray) -> np.ndarray:
    """Rotations about a unit `axis` (3,) by `angles_deg` (B,) (right hand), (B, 3, 3)."""
    theta = np.deg2rad(np.asarray(angles_deg, float))[:, None, None]
    kx, ky, kz = axis
    cross = np.array([[0.0, -kz, ky], [kz, 0.0, -kx], [-ky, kx, 0.0]])
    return np.eye(3) + np.sin(theta) * cross + (1.0 - np.cos(theta)) * (cross @ cross)


def conformations(phantom: Phantom, hinge_deg: np.ndarray) -> np.ndarray:
    """Atom positions for each hinge angle, (B, N, 3) Å: the arm turned about the hinge axis."""
    hinge_deg = np.atleast_1d(np.asarray(hinge_deg, float))
    turns = axis_rotation(phantom.hinge_axis, hinge_deg)  # (B, 3, 3)
    arm = phantom.atoms_angstrom[phantom.moving] - phantom.hinge_point_angstrom
    positions = np.repeat(phantom.atoms_angstrom[None], len(hinge_deg), axis=0)
    positions[:, phantom.moving] = np.einsum("bij,nj->bni", turns, arm) + phantom.hinge_point_angstrom
    return positions
