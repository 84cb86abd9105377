"""Shared pieces of the particle table (docs/conventions.md): its columns, numeric checks, defaults,
and the resolution of image locations to (stack path, 0-based index).

Rows are named in messages by their 1-based position in the input file ("data_particles row 3").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryofire.errors import InputError

CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor")
ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_COLUMNS = ("rlnOriginXAngst", "rlnOriginYAngst")
INTEGER_COLUMNS = ("image_index", "rlnImageSize", "rlnOpticsGroup")
REQUIRED_COLUMNS = ("rlnImageName", "image_path", "image_index", "rlnImageSize", "rlnImagePixelSize",
                    *CTF_COLUMNS, "rlnOpticsGroup")
# Columns that must hold numbers wherever they appear.
NUMERIC_COLUMNS = (*CTF_COLUMNS, *ANGLE_COLUMNS, *ORIGIN_COLUMNS, "rlnImagePixelSize", "rlnImageSize",
                   "rlnOpticsGroup", "rlnOriginX", "rlnOriginY", "rlnMagnification",
                   "rlnDetectorPixelSize", "rlnPixelSize")
_LARGEST_EXACT_INTEGER = 2.0**53  # float64 holds every integer up to this exactly
DEFAULTS = {"rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnOpticsGroup": 1}

_ABSOLUTE_PATH_HINT = ("if you trust this file, allow such paths with allow_absolute_paths=True "
                       "(--allow-absolute-paths), or give the folder holding the stacks as datadir "
                       "(--datadir)")


def require_columns(table: pd.DataFrame, columns: tuple[str, ...], path: str | Path, where: str) -> None:
    """InputError naming the first of ``columns`` missing from ``table``."""
    for column in columns:
        if column not in table.columns:
            raise InputError(path, f"{where} has no column {column}", "this column is required")


def ensure_numeric(table: pd.DataFrame, path: str | Path, where: str) -> pd.DataFrame:
    """Convert the known numeric columns present in ``table`` to numbers.

    Raises InputError naming the column, the first bad row and its value when a value is not a
    finite number (text, empty, NaN, infinite), or not a whole number in an integer column.
    """
    table = table.copy()
    for column in NUMERIC_COLUMNS:
        if column not in table.columns:
            continue
        integer = column in INTEGER_COLUMNS
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if integer:
            bad |= (values != np.round(values)) | (np.abs(values) > _LARGEST_EXACT_INTEGER)
        if bad.any():
            position = int(np.flatnonzero(bad)[0])
            value = table[column].iloc[position]
            value = value.item() if isinstance(value, np.generic) else value  # 'nan', not 'np.float64(nan)'
            raise InputError(path, f"column {column}: {where} row {position + 1} holds {value!r}, not a "
                             f"{'whole' if integer else 'finite'} number ({int(bad.sum())} bad rows in all)")
        table[column] = values.astype(np.int64) if integer else values
    return table


def add_defaults(table: pd.DataFrame) -> pd.DataFrame:
    """Add the optional columns that have a default (phase shift 0°, B-factor 0 Å², optics group 1)."""
    return table.assign(**{column: value for column, value in DEFAULTS.items() if column not in table.columns})


def split_image_names(names: pd.Series, path: str | Path, where: str) -> tuple[np.ndarray, pd.Series]:
    """Split RELION image names ``"index@file"`` into 0-based indices and file names.

    A name without ``@`` refers to the first (only) image of a single-image file.

    Returns:
        ``(image_index (N,) int64, file names as written)``.
    """
    parts = names.astype("str").str.partition("@")
    has_index = (parts[1] == "@").to_numpy()
    files = parts[2].where(has_index, parts[0])
    numbers = pd.to_numeric(parts[0].where(has_index, "1"), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = ~(np.isfinite(numbers) & (numbers >= 1) & (numbers == np.round(numbers))) | (files == "").to_numpy()
    bad |= names.isna().to_numpy()
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"column rlnImageName: {where} row {position + 1} holds "
                         f"{names.iloc[position]!r}, not 'index@stack' with a 1-based index")
    return numbers.astype(np.int64) - 1, files


def resolve_stack_paths(files: pd.Series, path: str | Path, datadir: str | Path | None,
                        allow_absolute_paths: bool, where: str) -> pd.Series:
    """Absolute stack paths (str) for the file names of ``files``.

    Names are relative to the folder of ``path`` or, when given, to ``datadir``; with ``datadir``
    a name whose path does not exist there is also looked up by its bare file name in ``datadir``
    (exports often carry project-relative paths). Absolute names and names escaping the folder
    through ``..`` raise InputError unless ``allow_absolute_paths``. Stacks are not required to
    exist (metadata-only files can be read); the image source checks that.
    """
    root = os.path.abspath(datadir if datadir is not None else Path(path).parent)
    first_rows = pd.Series(np.arange(len(files)), index=files.to_numpy()).groupby(level=0, sort=False).first()
    resolved = {name: _resolve_one(name, root, datadir is not None, allow_absolute_paths, path,
                                   f"{where} row {row + 1}")
                for name, row in first_rows.items()}
    return files.map(resolved).astype("str")


def _resolve_one(name: str, root: str, try_bare_name: bool, allow_absolute_paths: bool,
                 path: str | Path, row: str) -> str:
    """The absolute path of one stack name (see :func:`resolve_stack_paths`)."""
    candidate = os.path.normpath(os.path.join(root, name))
    if try_bare_name and not os.path.exists(candidate):
        bare = os.path.join(root, os.path.basename(name))
        if os.path.exists(bare):
            return bare
    if allow_absolute_paths:
        return candidate
    if os.path.isabs(name):
        raise InputError(path, f"{row}: image path {name!r} is absolute", _ABSOLUTE_PATH_HINT)
    if os.path.commonpath([root, candidate]) != root:
        raise InputError(path, f"{row}: image path {name!r} leads outside {root}", _ABSOLUTE_PATH_HINT)
    return candidate
