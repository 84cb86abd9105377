"""cryoSPARC particle files (.cs, a numpy structured array) to the particle table.

Units are converted to RELION's (docs/conventions.md): angles from radians to degrees, the
axis-angle pose ``w`` to Euler angles of ``A = expm([w]_x)^T``, shifts from pixels to Å
(``rlnOriginXAngst = shift_x * psize_A``, the same sign as RELION's origin).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryofire.errors import InputError
from cryofire.io._euler import axis_angle_to_matrix, matrix_to_euler
from cryofire.io._table import add_defaults, ensure_numeric, resolve_stack_paths

_REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A", "ctf/accel_kv", "ctf/cs_mm",
                    "ctf/amp_contrast", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/phase_shift_rad")
# numpy dtype kinds accepted for these required fields, and what they hold; the others hold numbers of any kind.
_FIELD_KINDS = {"blob/path": ("S", "file names (bytes)"), "blob/idx": ("iu", "integers"),
                "blob/shape": ("iu", "integers")}
_POSE_FIELDS = ("alignments3D/pose", "alignments3D/shift")
_OPTICS_COLUMNS = ("rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
                   "rlnAmplitudeContrast")


def read_cs(path: str | Path, datadir: str | Path | None = None,
            allow_absolute_paths: bool = False) -> pd.DataFrame:
    """Read a cryoSPARC particle file into the particle table.

    Poses (``rlnAngleRot/Tilt/Psi``, ``rlnOriginXAngst/YAngst``) are added only when the file has
    ``alignments3D``; files with ``alignments2D`` only give CTF and image locations. Optics groups
    number the distinct (exposure group, pixel size, box, voltage, Cs, amplitude contrast) sets from 1.

    Args:
        path: the .cs file.
        datadir: folder the blob paths are relative to (default: the .cs file's folder); paths not
            found there are also looked up by their bare file name in ``datadir``.
        allow_absolute_paths: accept absolute blob paths and paths leading out of the folder.

    Returns:
        The particle table, one row per particle, in file order.
    """
    if datadir is not None and not os.path.isdir(datadir):
        raise InputError(datadir, "datadir is not a folder")
    particles = _load(path)
    table = _ctf_and_images(particles, path)
    if all(field in particles.dtype.names for field in _POSE_FIELDS):
        table = table.assign(**_poses(particles))
    table = ensure_numeric(table, path, "particle")
    table["image_path"] = resolve_stack_paths(table["blob_path"], path, datadir, allow_absolute_paths, "particle")
    return add_defaults(table.drop(columns="blob_path"))


def _load(path: str | Path) -> np.ndarray:
    """The structured array of a .cs file; InputError if unreadable or missing a required field."""
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        particles = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises many types (ValueError, EOFError, tokenize errors) on damaged files
        raise InputError(path, f"not a readable cryoSPARC .cs file ({type(error).__name__}: {error})",
                         "the file is damaged or not a .cs file: export it again from cryoSPARC") from None
    names = particles.dtype.names or ()
    missing = [field for field in _REQUIRED_FIELDS if field not in names]
    if missing:
        raise InputError(path, f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                         "export the particles from a job that has CTF estimates (e.g. Extract, Refine)")
    _require_field_types(particles.dtype, path)
    if particles.ndim != 1 or len(particles) == 0:
        raise InputError(path, "holds no particles")
    return particles


def _require_field_types(dtype: np.dtype, path: str | Path) -> None:
    """InputError unless blob/path holds bytes, blob/idx and blob/shape integers, the other fields numbers."""
    for field in _REQUIRED_FIELDS:
        kinds, expected = _FIELD_KINDS.get(field, ("biuf", "numbers"))
        if dtype[field].base.kind not in kinds:
            raise InputError(path, f"field {field} holds {dtype[field]} values, not {expected}")


def _blob_paths(particles: np.ndarray, path: str | Path) -> pd.Series:
    """The stack file names of ``blob/path`` (UTF-8, without cryoSPARC's leading '>')."""
    names = pd.Series(particles["blob/path"]).str.decode("utf-8", errors="replace")
    bad = np.flatnonzero(names.str.contains("\ufffd", regex=False))
    if len(bad):
        raise InputError(path, f"field blob/path: particle row {bad[0] + 1} holds "
                         f"{bytes(particles['blob/path'][bad[0]])!r}, not UTF-8 text")
    return names.str.removeprefix(">")


def _ctf_and_images(particles: np.ndarray, path: str | Path) -> pd.DataFrame:
    """CTF, pixel size, box size, optics group and image location columns in RELION units."""
    shape = np.asarray(particles["blob/shape"]).reshape(len(particles), -1)
    if shape.shape[1] != 2:
        raise InputError(path, f"field blob/shape holds {shape.shape[1]} numbers per particle, not 2")
    if np.any(shape[:, 0] != shape[:, 1]):
        position = int(np.flatnonzero(shape[:, 0] != shape[:, 1])[0])
        raise InputError(path, f"field blob/shape: particle row {position + 1} has shape "
                         f"{shape[position].tolist()}, not a square image")
    blob_path = _blob_paths(particles, path)
    index = particles["blob/idx"].astype(np.int64)
    table = pd.DataFrame({
        "rlnImageName": (pd.Series(index + 1).astype(str).str.zfill(6) + "@" + blob_path),
        "blob_path": blob_path,
        "image_index": index,
        "rlnImageSize": shape[:, 0].astype(np.int64),
        "rlnImagePixelSize": particles["blob/psize_A"].astype(np.float64),
        "rlnVoltage": particles["ctf/accel_kv"].astype(np.float64),
        "rlnSphericalAberration": particles["ctf/cs_mm"].astype(np.float64),
        "rlnAmplitudeContrast": particles["ctf/amp_contrast"].astype(np.float64),
        "rlnDefocusU": particles["ctf/df1_A"].astype(np.float64),
        "rlnDefocusV": particles["ctf/df2_A"].astype(np.float64),
        "rlnDefocusAngle": np.rad2deg(particles["ctf/df_angle_rad"].astype(np.float64)),
        "rlnPhaseShift": np.rad2deg(particles["ctf/phase_shift_rad"].astype(np.float64)),
    })
    if "ctf/bfactor" in particles.dtype.names:
        table["rlnCtfBfactor"] = particles["ctf/bfactor"].astype(np.float64)
    exposure_group = particles["ctf/exp_group_id"] if "ctf/exp_group_id" in particles.dtype.names else 0
    keys = table[list(_OPTICS_COLUMNS)].assign(exposure_group=exposure_group)
    table["rlnOpticsGroup"] = keys.groupby(list(keys.columns), sort=True, dropna=False).ngroup().astype(np.int64) + 1
    return table


def _poses(particles: np.ndarray) -> dict[str, np.ndarray]:
    """RELION Euler angles (degrees) and origins (Å) from ``alignments3D`` pose and shift."""
    matrices = axis_angle_to_matrix(particles["alignments3D/pose"]).transpose(0, 2, 1)
    angles = matrix_to_euler(matrices)
    shift_angstrom = particles["alignments3D/shift"].astype(np.float64) * particles["blob/psize_A"][:, None]
    return {"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": shift_angstrom[:, 0], "rlnOriginYAngst": shift_angstrom[:, 1]}
