"""Run outputs any cryo-EM tool can read: inferred poses as a RELION 3.1 star file, latents as .npy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofire import physics
from cryofire.io import write_star


def table_with_poses(table: pd.DataFrame, rotations: np.ndarray, origins_px: np.ndarray,
                     classes: np.ndarray | None = None) -> pd.DataFrame:
    """The input table with rlnAngleRot/Tilt/Psi (deg) and rlnOriginX/YAngst (Å) replaced by the given poses
    (and rlnClassNumber by the given classes).

    Args:
        rotations: (N, 3, 3) RELION pose matrices, in the table's row order.
        origins_px: (N, 2) RELION origins in pixels of the table's images.
        classes: (N,) 0-based classes, written 1-based as RELION does; None keeps the input's column, if any.
    """
    rot, tilt, psi = physics.matrix_to_euler(torch.as_tensor(rotations, dtype=torch.float64))
    out = table.copy()
    out["rlnAngleRot"], out["rlnAngleTilt"], out["rlnAnglePsi"] = rot.numpy(), tilt.numpy(), psi.numpy()
    pixel_size = table["rlnImagePixelSize"].to_numpy(np.float64)
    out["rlnOriginXAngst"] = origins_px[:, 0] * pixel_size
    out["rlnOriginYAngst"] = origins_px[:, 1] * pixel_size
    if classes is not None:
        out["rlnClassNumber"] = np.asarray(classes, dtype=np.int64) + 1
    return out


def write_poses_star(path: str | Path, table: pd.DataFrame, rotations: np.ndarray, origins_px: np.ndarray,
                     classes: np.ndarray | None = None) -> None:
    """RELION 3.1 star file of the input particles with the inferred poses and classes (atomic)."""
    write_star(path, table_with_poses(table, rotations, origins_px, classes))


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
