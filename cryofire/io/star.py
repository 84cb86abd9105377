"""RELION STAR files to and from the particle table (docs/conventions.md).

Reads RELION 3.0 (one particle block, CTF and pixel size per particle) and RELION 3.1/4/5
(``data_optics`` + ``data_particles``, optics merged into each particle). Writes RELION 3.1.
"""

from __future__ import annotations

import csv
import linecache
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryofire.errors import InputError
from cryofire.io._files import atomic_output
from cryofire.io._table import (add_defaults, ensure_numeric, require_columns, resolve_stack_paths,
                                split_image_names)
from cryofire.io.mrc import read_stack_layout, stack_pixel_size

# Columns read from the file that must be present once optics are merged in.
_REQUIRED_IN_FILE = ("rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                     "rlnSphericalAberration", "rlnAmplitudeContrast")
_OPTICS_COLUMNS = ("rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnImageSize",
                   "rlnImageDimensionality", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
# Further RELION optics labels, moved to data_optics on writing when present.
_EXTRA_OPTICS_COLUMNS = ("rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize",
                         "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike",
                         "rlnEvenZernike", "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
_INTERNAL_COLUMNS = ("image_path", "image_index")
_NEEDED_FOR_WRITING = (*_INTERNAL_COLUMNS, "rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize", "rlnVoltage",
                       "rlnSphericalAberration", "rlnAmplitudeContrast")
_STAR_VERSION = "# version 30001"


def read_star(path: str | Path, datadir: str | Path | None = None,
              allow_absolute_paths: bool = False) -> pd.DataFrame:
    """Read a RELION particle STAR file into the particle table.

    Pixel size comes from ``rlnImagePixelSize``, else ``rlnDetectorPixelSize`` (µm) * 1e4 /
    ``rlnMagnification``, else ``rlnPixelSize``, else (with a warning) the first stack's header.
    Pixel origins ``rlnOriginX/Y`` (RELION 3.0) become ``rlnOriginXAngst/YAngst``. Missing
    ``rlnPhaseShift``/``rlnCtfBfactor`` default to 0 and ``rlnOpticsGroup`` to 1. Without
    ``rlnImageSize`` the box size is read from the header of the first stack; when that stack
    cannot be read the column holds <NA> (with a warning). Stacks need not exist otherwise.

    Args:
        path: the .star file.
        datadir: folder the image paths are relative to (default: the STAR file's folder). Names
            not found there are also looked up by their bare file name in ``datadir``.
        allow_absolute_paths: accept absolute image paths and paths leading out of the folder.

    Returns:
        The particle table, one row per particle, in file order, index 0..N-1.
    """
    if datadir is not None and not os.path.isdir(datadir):
        raise InputError(datadir, "datadir is not a folder")
    particles, optics, block = _particle_blocks(path)
    where = f"data_{block}"
    if optics is not None:
        particles = _merge_optics(particles, optics, path)
        where = f"data_{block} (with data_optics merged in)"
    require_columns(particles, _REQUIRED_IN_FILE, path, where)
    table = ensure_numeric(particles, path, f"data_{block}")
    image_index, files = split_image_names(table["rlnImageName"], path, f"data_{block}")
    table["image_path"] = resolve_stack_paths(files, path, datadir, allow_absolute_paths, f"data_{block}")
    table["image_index"] = image_index
    table = add_defaults(_origins_in_angstrom(_with_pixel_size(table, path, where)))
    return _with_image_size(table, path)


def _particle_blocks(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """``(particles, optics or None, particle block name)`` of a STAR file."""
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as error:  # the parser raises many types on malformed text
        detail = " ".join(str(error).split())  # on one line
        raise InputError(path, f"not a readable STAR file ({type(error).__name__}: {detail})",
                         "each row of a loop_ needs one value per label above it; quote values with spaces") from None
    finally:
        linecache.clearcache()  # the parser reads lines through linecache and leaves them cached when it fails
    loops = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    optics = loops.get("optics")
    if "particles" in loops:
        name = "particles"
    else:
        name = next((name for name, block in loops.items() if "rlnImageName" in block.columns), None)
        if name is None:
            raise InputError(path, "no data block with an rlnImageName column", "is this a particle STAR file?")
    if len(loops[name]) == 0:
        raise InputError(path, f"data_{name} holds no particles")
    for block_name in {name, "optics"} & set(loops):
        _require_unique_columns(loops[block_name], path, f"data_{block_name}")
    return loops[name].reset_index(drop=True), optics, name


def _require_unique_columns(block: pd.DataFrame, path: str | Path, where: str) -> None:
    """InputError naming the first column label that ``block`` has twice."""
    repeated = block.columns[block.columns.duplicated()]
    if len(repeated):
        raise InputError(path, f"{where} has column {repeated[0]} twice", "delete one of the two header lines")


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Copy each optics group's values into its particles (per-particle values win)."""
    require_columns(optics, ("rlnOpticsGroup",), path, "data_optics")
    require_columns(particles, ("rlnOpticsGroup",), path, "data_particles")
    optics = ensure_numeric(optics, path, "data_optics")
    groups = ensure_numeric(particles[["rlnOpticsGroup"]], path, "data_particles")["rlnOpticsGroup"]
    repeated = optics["rlnOpticsGroup"][optics["rlnOpticsGroup"].duplicated()]
    if len(repeated):
        raise InputError(path, f"data_optics defines optics group {repeated.iloc[0]} twice")
    unknown = ~groups.isin(optics["rlnOpticsGroup"])
    if unknown.any():
        position = int(np.flatnonzero(unknown)[0])
        raise InputError(path, f"data_particles row {position + 1} uses optics group {groups.iloc[position]}, "
                         f"which data_optics does not define (it defines {sorted(optics['rlnOpticsGroup'])})",
                         "add the group to data_optics or correct rlnOpticsGroup")
    shared = [column for column in optics.columns if column in particles.columns and column != "rlnOpticsGroup"]
    return particles.assign(rlnOpticsGroup=groups).merge(optics.drop(columns=shared), how="left",
                                                         on="rlnOpticsGroup", sort=False)


def _with_pixel_size(table: pd.DataFrame, path: str | Path, where: str) -> pd.DataFrame:
    """Add ``rlnImagePixelSize`` (Å) from the RELION 3.0 fields when absent; check it is positive."""
    if "rlnImagePixelSize" in table.columns:
        pixel_size = table["rlnImagePixelSize"]
    elif {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        pixel_size = table["rlnDetectorPixelSize"] * 1e4 / table["rlnMagnification"]
    elif "rlnPixelSize" in table.columns:
        pixel_size = table["rlnPixelSize"]
    else:
        pixel_size = pd.Series(_pixel_size_from_first_stack(table, path, where), index=table.index)
    bad = ~(np.isfinite(pixel_size) & (pixel_size > 0))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise InputError(path, f"{where} row {position + 1}: pixel size {pixel_size.iloc[position]} Å "
                         "is not positive")
    return table.assign(rlnImagePixelSize=pixel_size.astype(np.float64))


def _pixel_size_from_first_stack(table: pd.DataFrame, path: str | Path, where: str) -> float:
    """The pixel size (Å) in the header of the first stack, for STAR files that give none (with a warning)."""
    first_stack = table["image_path"].iloc[0]
    try:
        pixel_size = stack_pixel_size(first_stack)
    except InputError:
        pixel_size = None
    if pixel_size is None:
        raise InputError(path, f"{where} has no column rlnImagePixelSize, and the header of its first "
                         f"stack {first_stack} gives no pixel size either",
                         "add rlnImagePixelSize in Å (in data_optics for RELION 3.1+), or "
                         "rlnDetectorPixelSize (µm) and rlnMagnification")
    warnings.warn(f"{path}: no pixel size in the STAR file; using {pixel_size:g} Å from the header "
                  f"of {first_stack}", stacklevel=4)
    return pixel_size


def _origins_in_angstrom(table: pd.DataFrame) -> pd.DataFrame:
    """Replace RELION 3.0 origins in pixels (``rlnOriginX/Y``) by ``rlnOriginXAngst/YAngst``."""
    if "rlnOriginXAngst" in table.columns or "rlnOriginX" not in table.columns:
        return table
    pixel_size = table["rlnImagePixelSize"]
    return table.assign(rlnOriginXAngst=table["rlnOriginX"] * pixel_size,
                        rlnOriginYAngst=table["rlnOriginY"] * pixel_size).drop(columns=["rlnOriginX", "rlnOriginY"])


def _with_image_size(table: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Add ``rlnImageSize`` (px) from the first stack's header when the file does not give it."""
    if "rlnImageSize" in table.columns:
        return table
    first_stack = table["image_path"].iloc[0]
    try:
        box_px = read_stack_layout(first_stack).box_px
    except InputError as error:
        warnings.warn(f"{path}: no rlnImageSize, and the first stack cannot be read to find it "
                      f"({error}); the image size stays unknown", stacklevel=3)
        return table.assign(rlnImageSize=pd.array([pd.NA] * len(table), dtype="Int64"))
    return table.assign(rlnImageSize=np.int64(box_px))


def write_star(path: str | Path, table: pd.DataFrame) -> None:
    """Write the particle table as a RELION 3.1 STAR file (``data_optics`` + ``data_particles``), atomically.

    ``rlnImageName`` is rebuilt as ``"%06d@stack"`` from ``image_path``/``image_index``: the stack
    path relative to the STAR file's folder when the stack lies inside it, else absolute (read
    such files back with ``allow_absolute_paths=True``). The internal columns are not written.
    """
    missing = [column for column in _NEEDED_FOR_WRITING if column not in table.columns]
    if missing:
        raise ValueError(f"cannot write {path}: the particle table lacks {missing}")
    if table["rlnImageSize"].isna().any():
        raise ValueError("rlnImageSize is unknown for some particles; set it from the stacks "
                         "(ImageSource.image_size) before writing")
    optics, particles = _split_optics(table)
    particles = particles.assign(rlnImageName=_image_names(table, Path(path).parent))
    text = _loop_text("optics", optics) + _loop_text("particles", particles)
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def _split_optics(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(data_optics, data_particles)``: one optics row per group; ValueError if a group's optics vary."""
    defaults = {"rlnImageDimensionality": 2,
                "rlnOpticsGroupName": "opticsGroup" + table["rlnOpticsGroup"].astype(str)}
    table = table.assign(**{column: value for column, value in defaults.items() if column not in table.columns})
    columns = [*_OPTICS_COLUMNS, *(column for column in _EXTRA_OPTICS_COLUMNS if column in table.columns)]
    optics = table[columns].drop_duplicates()
    if optics["rlnOpticsGroup"].duplicated().any():
        varying = optics.groupby("rlnOpticsGroup").nunique().max().idxmax()
        raise ValueError(f"particles of one optics group differ in {varying}; give them different rlnOpticsGroup")
    particles = table.drop(columns=[*columns[1:], *_INTERNAL_COLUMNS])
    return optics.sort_values("rlnOpticsGroup").reset_index(drop=True), particles


def _image_names(table: pd.DataFrame, folder: Path) -> pd.Series:
    """RELION image names ``"%06d@stack"``, the stack relative to ``folder`` when inside it."""
    root = os.path.abspath(folder)
    absolute = {stack: os.path.abspath(stack) for stack in table["image_path"].unique()}
    stacks = {stack: (os.path.relpath(full, root) if os.path.commonpath([root, full]) == root else full)
              for stack, full in absolute.items()}
    numbers = (table["image_index"].astype(np.int64) + 1).astype(str).str.zfill(6)
    return numbers + "@" + table["image_path"].map(stacks)


def _loop_text(name: str, frame: pd.DataFrame) -> str:
    """One ``data_<name>`` loop block of a RELION 3.1 STAR file."""
    header = [_STAR_VERSION, "", f"data_{name}", "", "loop_"]
    header += [f"_{column} #{number}" for number, column in enumerate(frame.columns, 1)]
    body = _quote_strings(frame).to_csv(sep="\t", header=False, index=False,
                                        na_rep="nan", quoting=csv.QUOTE_NONE)
    return "\n".join(header) + "\n" + body + "\n\n"


def _quote_strings(frame: pd.DataFrame) -> pd.DataFrame:
    """Put double quotes around text values that are empty or contain white space."""
    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_string_dtype(frame[column]) or frame[column].dtype == object:
            text = frame[column].astype(str)
            needs_quotes = text.str.contains(r"\s") | (text == "")
            if needs_quotes.any():
                frame[column] = text.where(~needs_quotes, '"' + text + '"')
    return frame
