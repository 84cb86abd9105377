"""Particles from any supported file, and the lazy image source over their stacks.

The particle table (docs/conventions.md) carries the metadata; :class:`ImageSource` reads the
pixels on demand from the stacks with explicit reads (no memory maps, so resident memory stays at one
batch), so data sets larger than memory can be used.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cryofire.errors import InputError
from cryofire.io._table import ANGLE_COLUMNS, INTEGER_COLUMNS, ORIGIN_COLUMNS, REQUIRED_COLUMNS, require_columns
from cryofire.io.cryosparc import read_cs
from cryofire.io.mrc import StackLayout, read_stack_layout
from cryofire.io.star import read_star

_TEXT_COLUMNS = ("rlnImageName", "image_path")
_STACK_HINT = ("check the image paths in the particle file, or give the folder holding the stacks "
               "as datadir (--datadir)")


def read_particles(path: str | Path, datadir: str | Path | None = None,
                   allow_absolute_paths: bool = False) -> pd.DataFrame:
    """Read a RELION ``.star`` or cryoSPARC ``.cs`` particle file into a checked particle table.

    See :func:`~cryofire.io.star.read_star` and :func:`~cryofire.io.cryosparc.read_cs` for the
    meaning of ``datadir`` and ``allow_absolute_paths``.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".star":
        table = read_star(path, datadir, allow_absolute_paths)
    elif suffix == ".cs":
        table = read_cs(path, datadir, allow_absolute_paths)
    else:
        raise InputError(path, f"unknown particle file type {suffix!r}",
                         "give a RELION .star file or a cryoSPARC .cs file")
    validate_table(table, path)
    return table


def validate_table(table: pd.DataFrame, path: str | Path) -> None:
    """Check that ``table`` is a particle table: required columns present with numeric dtypes.

    Integer columns (``image_index``, ``rlnImageSize``, ``rlnOpticsGroup``) must hold integers
    (``rlnImageSize`` may be <NA> when unknown); Euler angles come as a full set of three.
    ``path`` names the table's source in the InputError raised otherwise.
    """
    require_columns(table, REQUIRED_COLUMNS, path, "the particle table")
    present = [column for column in (*REQUIRED_COLUMNS, *ANGLE_COLUMNS, *ORIGIN_COLUMNS)
               if column in table.columns and column not in _TEXT_COLUMNS]
    for column in present:
        integer = column in INTEGER_COLUMNS
        accepted = pd.api.types.is_integer_dtype if integer else pd.api.types.is_numeric_dtype
        if not accepted(table[column]):
            raise InputError(path, f"column {column} has dtype {table[column].dtype}, "
                             f"expected {'integers' if integer else 'numbers'}")
    angles = [column for column in ANGLE_COLUMNS if column in table.columns]
    if angles and len(angles) != len(ANGLE_COLUMNS):
        missing = sorted(set(ANGLE_COLUMNS) - set(angles))
        raise InputError(path, f"the particle table has {', '.join(angles)} but not {', '.join(missing)}",
                         "Euler angles come as rlnAngleRot, rlnAngleTilt and rlnAnglePsi together")


class ImageSource:
    """Lazy access to the images of a particle table, with bounded memory.

    Every stack is checked when the source is made (exists, readable, one box size, every
    particle's index inside its stack); pixels are read only when asked for. At most
    ``max_open_stacks`` stacks are memory-mapped at a time (least recently used closed first).

    Args:
        table: particle table with ``image_path``, ``image_index`` (and ideally ``rlnImageName``).
        check_finite: raise InputError when a requested image holds NaN or infinite pixels.
        max_open_stacks: how many stack files stay open at once.
    """

    def __init__(self, table: pd.DataFrame, check_finite: bool = True, max_open_stacks: int = 8) -> None:
        missing = [column for column in ("image_path", "image_index") if column not in table.columns]
        if missing:
            raise ValueError(f"the particle table lacks the column(s) {missing}")
        if len(table) == 0:
            raise ValueError("the particle table is empty")
        codes, stacks = pd.factorize(table["image_path"], sort=False)
        self._stacks = [str(stack) for stack in stacks]
        self._stack_codes = codes.astype(np.int64)
        self._image_index = table["image_index"].to_numpy(np.int64)
        names = table["rlnImageName"] if "rlnImageName" in table.columns else table["image_path"]
        self._names = names.astype(str).to_numpy()
        self._labels = table.index.to_numpy()
        self.check_finite = check_finite
        self._max_open_stacks = max_open_stacks
        self._open: OrderedDict[int, int] = OrderedDict()
        self._layouts = self._read_layouts()
        self.image_size = self._layouts[0].box_px
        self._check_indices()
        self._check_table_sizes(table.get("rlnImageSize"))

    def __len__(self) -> int:
        return len(self._image_index)

    def _describe(self, row: int) -> str:
        """A particle named for messages: its image name and its 1-based row in the particle file.

        The row is the table's integer index label + 1 (read_particles numbers the rows of the file from 0, and a
        subset of the table keeps those labels); other labels are shown as they are.
        """
        label = self._labels[row]
        where = f"particle file row {label + 1}" if isinstance(label, (int, np.integer)) else f"table row {label!r}"
        return f"particle {self._names[row]} ({where})"

    def _read_layouts(self) -> list[StackLayout]:
        """The layout of every stack, checking each exists, is readable and has the first one's box size."""
        _, first_rows = np.unique(self._stack_codes, return_index=True)
        layouts: list[StackLayout] = []
        for stack, row in zip(self._stacks, first_rows):
            if not os.path.isfile(stack):
                raise InputError(stack, f"image stack not found (first used by {self._describe(row)})", _STACK_HINT)
            layout = read_stack_layout(stack)
            if layouts and layout.box_px != layouts[0].box_px:
                raise InputError(stack, f"images are {layout.box_px} px but those of {layouts[0].path} are "
                                 f"{layouts[0].box_px} px", "all stacks of one data set must share one box size")
            layouts.append(layout)
        return layouts

    def _check_indices(self) -> None:
        """InputError naming the first particle whose index lies outside its stack."""
        counts = np.array([layout.n_images for layout in self._layouts], dtype=np.int64)
        outside = (self._image_index < 0) | (self._image_index >= counts[self._stack_codes])
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            code = self._stack_codes[row]
            raise InputError(self._stacks[code], f"{self._describe(row)} asks for image "
                             f"{self._image_index[row] + 1}, but the stack holds {counts[code]} images",
                             "image numbers before '@' count from 1; is this the stack the particles were "
                             "extracted to?")

    def _check_table_sizes(self, table_sizes: pd.Series | None) -> None:
        """InputError when the table's ``rlnImageSize`` disagrees with the stacks' box size."""
        if table_sizes is None:
            return
        sizes = table_sizes.to_numpy(dtype=np.float64, na_value=np.nan)
        wrong = np.flatnonzero(~np.isnan(sizes) & (sizes != self.image_size))
        if len(wrong):
            row = int(wrong[0])
            raise InputError(self._stacks[self._stack_codes[row]],
                             f"images are {self.image_size} px, but rlnImageSize says {int(sizes[row])} px "
                             f"for {self._describe(row)}", "correct rlnImageSize in the particle file")

    def __getitem__(self, indices: ArrayLike) -> np.ndarray:
        """Images of the table rows at positions ``indices`` (0-based), in that order.

        Returns:
            ``(B, D, D)`` float32 array ``[image, y, x]``.
        """
        rows = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if rows.ndim != 1:
            raise ValueError(f"expected a 1D array of row positions, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row positions must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        images = np.empty((len(rows), self.image_size, self.image_size), dtype=np.float32)
        codes = self._stack_codes[rows]
        for code in np.unique(codes):
            positions = np.flatnonzero(codes == code)
            self._read_from_stack(int(code), self._image_index[rows[positions]], images, positions)
        if self.check_finite:
            self._check_finite(images, rows)
        return images

    def _read_from_stack(self, code: int, image_indices: np.ndarray, out: np.ndarray,
                         positions: np.ndarray) -> None:
        """Copy images ``image_indices`` of one stack into ``out[positions]``, reading sorted contiguous runs."""
        descriptor, layout = self._descriptor(code), self._layouts[code]
        order = np.argsort(image_indices, kind="stable")
        sorted_indices = image_indices[order]
        run_starts = np.flatnonzero(np.diff(sorted_indices) != 1) + 1
        for run in np.split(np.arange(len(sorted_indices)), run_starts):
            out[positions[order[run]]] = layout.read_run(descriptor, int(sorted_indices[run[0]]), len(run))

    def _descriptor(self, code: int) -> int:
        """An open file descriptor of stack ``code`` (closing the least recently used beyond the limit)."""
        if code in self._open:
            self._open.move_to_end(code)
            return self._open[code]
        self._open[code] = os.open(self._stacks[code], os.O_RDONLY)
        if len(self._open) > self._max_open_stacks:
            os.close(self._open.popitem(last=False)[1])
        return self._open[code]

    def close(self) -> None:
        """Close the open stack files (reading again reopens them)."""
        open_files = getattr(self, "_open", {})  # absent when __init__ failed early
        while open_files:
            os.close(open_files.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def _check_finite(self, images: np.ndarray, rows: np.ndarray) -> None:
        """InputError naming the particles whose images hold NaN or infinite pixels."""
        finite = np.isfinite(images).all(axis=(1, 2))
        if finite.all():
            return
        bad = np.flatnonzero(~finite)
        n_pixels = int((~np.isfinite(images[bad])).sum())
        listed = "; ".join(self._describe(rows[position]) for position in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InputError(self._stacks[self._stack_codes[rows[bad[0]]]],
                         f"{n_pixels} NaN or infinite pixels in {len(bad)} image(s): {listed}{more}",
                         "remove these particles from the particle file, repair the stack, or leave such images out "
                         "with `cryofire preprocess --skip-bad-images`")

    def iter_batches(self, batch_size: int,
                     indices: ArrayLike | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(row positions (B,), images (B, D, D) float32)`` over ``indices`` (default: all rows), in order."""
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            yield batch, self[batch]

    def __getstate__(self) -> dict:
        """Pickle without the open files (worker processes reopen stacks as needed)."""
        return {**self.__dict__, "_open": OrderedDict()}
