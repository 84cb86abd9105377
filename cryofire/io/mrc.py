"""MRC volumes and image stacks: read a volume, memory-map a stack, write both.

Volumes are ``vol[z, y, x]`` float32 arrays and stacks ``(N, D, D)`` arrays ``img[y, x]``
(docs/conventions.md). Headers from older tools often lack the map ID or the voxel size; both
are accepted. What cannot be read safely (a truncated file, a complex or 4-bit mode, non-square
images, a file with no images) raises :class:`~cryofire.errors.InputError`.

Written files keep RELION's origin convention: header origin 0 and ``nxstart = nystart =
nzstart = 0``, so ChimeraX places cryofire maps exactly where it places the maps RELION writes.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import data_dtype_from_header, machine_stamp_from_byte_order

from cryofire.errors import InputError
from cryofire.io._files import atomic_output, temporary_sibling

# MRC modes with a real numpy equivalent: int8, int16, float32, uint16, float16.
_REAL_MODES = (0, 1, 2, 6, 12)
_IMAGE_STACK_SPACE_GROUP = 0


def _read_header(path: str | Path) -> np.recarray:
    """The MRC header of ``path`` with its byte order applied; InputError if unreadable."""
    if not os.path.isfile(path):
        raise InputError(path, "file not found")
    if os.path.getsize(path) < HEADER_DTYPE.itemsize:
        raise InputError(path, f"file is {os.path.getsize(path)} bytes, too short for an MRC header "
                         f"({HEADER_DTYPE.itemsize} bytes)", "the file is empty or truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing map ID or machine stamp is common and harmless
        try:
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                return mrc.header.copy()
        except ValueError as error:
            raise InputError(path, f"not a readable MRC file ({error})",
                             "its header is damaged: re-copy or re-export the file") from None


def _data_shape(header: np.recarray, path: str | Path) -> tuple[int, int, int]:
    """``(nz, ny, nx)`` after checking the mode and that the file holds all the data it declares."""
    mode = int(header.mode)
    if mode not in _REAL_MODES:
        raise InputError(path, f"MRC mode {mode} is not supported (complex, 4-bit or unknown)",
                         "convert the file to float32 (mode 2), e.g. with relion_image_handler")
    shape = (int(header.nz), int(header.ny), int(header.nx))
    if min(shape) <= 0:
        raise InputError(path, f"the header declares an empty data block (nx, ny, nz = "
                         f"{shape[2]}, {shape[1]}, {shape[0]})", "the file holds no images or its header is damaged")
    if int(header.nsymbt) < 0:
        raise InputError(path, f"corrupt header: extended header size {int(header.nsymbt)} bytes")
    item_bytes = data_dtype_from_header(header).itemsize
    expected_bytes = HEADER_DTYPE.itemsize + int(header.nsymbt) + math.prod(shape) * item_bytes  # no int64 overflow
    actual_bytes = os.path.getsize(path)
    if actual_bytes < expected_bytes:
        raise InputError(path, f"file is truncated: {actual_bytes} bytes, but its header "
                         f"declares {shape[0]} sections of {shape[2]}x{shape[1]} (mode {mode}), "
                         f"{expected_bytes} bytes", "re-copy or re-export the file")
    return shape


def _voxel_size_from_header(header: np.recarray) -> tuple[float, float, float] | None:
    """Voxel size (x, y, z) in Å from ``cella / m``; None when the header does not set it.

    An unset y or z size (zero cell or grid, as in some image stacks) takes the x size.
    """
    grid = (int(header.mx), int(header.my), int(header.mz))
    cell = (float(header.cella.x), float(header.cella.y), float(header.cella.z))
    if grid[0] <= 0 or cell[0] <= 0:
        return None
    size_x = cell[0] / grid[0]
    size_y, size_z = (c / g if c > 0 and g > 0 else size_x for c, g in zip(cell[1:], grid[1:]))
    return (size_x, size_y, size_z)


@dataclass(frozen=True)
class StackLayout:
    """Where and how an image stack stores its pixels, from its (checked) header.

    ``dtype`` is the pixel type with the file's byte order; ``data_offset_bytes`` skips the
    header and any extended header.
    """

    path: str
    n_images: int
    box_px: int
    dtype: np.dtype
    data_offset_bytes: int

    def open(self) -> np.ndarray:
        """Memory-map the stack read-only as ``(N, D, D)`` ``[image, y, x]`` in the file's dtype."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.data_offset_bytes,
                         shape=(self.n_images, self.box_px, self.box_px))

    def read_run(self, descriptor: int, first: int, count: int) -> np.ndarray:
        """Images ``first .. first + count - 1`` as ``(count, D, D)`` in the file's dtype, by one ``pread``.

        Unlike a memory map, explicit reads leave no file pages mapped into the process, so the resident
        memory of a long pass over a large stack stays at one batch.
        """
        image_bytes = self.box_px * self.box_px * self.dtype.itemsize
        data = os.pread(descriptor, count * image_bytes, self.data_offset_bytes + first * image_bytes)
        if len(data) != count * image_bytes:
            raise InputError(self.path, f"could not read images {first + 1}..{first + count}: the file is shorter "
                             "than its header says (truncated while being read?)")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.box_px, self.box_px)


def read_stack_layout(path: str | Path) -> StackLayout:
    """The layout of an image stack, from its header.

    Raises InputError for a missing, empty, truncated or non-square stack, or an unsupported mode.
    """
    header = _read_header(path)
    n_images, ny, nx = _data_shape(header, path)
    if nx != ny:
        raise InputError(path, f"images are {nx}x{ny} px, not square")
    return StackLayout(path=str(path), n_images=n_images, box_px=nx, dtype=data_dtype_from_header(header),
                       data_offset_bytes=HEADER_DTYPE.itemsize + int(header.nsymbt))


def open_stack(path: str | Path) -> np.ndarray:
    """Memory-map an image stack read-only (pixels are read from disk only when indexed).

    Returns:
        ``(N, D, D)`` array ``[image, y, x]`` in the file's own dtype (float32 for mode 2).
        A single image (``nz = 1``) gives ``N = 1``.
    """
    return read_stack_layout(path).open()


def stack_pixel_size(path: str | Path) -> float | None:
    """Pixel size of an image stack in Å from its header, or None when the header leaves it unset."""
    voxel_size = _voxel_size_from_header(_read_header(path))
    return None if voxel_size is None else voxel_size[0]


def _axis_order(header: np.recarray, path: str | Path) -> tuple[int, int, int] | None:
    """Transpose that brings data stored as (sections, rows, columns) to ``[z, y, x]``; None if standard."""
    mapping = (int(header.mapc), int(header.mapr), int(header.maps))
    if mapping == (1, 2, 3):
        return None
    if sorted(mapping) != [1, 2, 3]:
        warnings.warn(f"{path}: invalid axis order (mapc, mapr, maps) = {mapping}; assuming x, y, z",
                      stacklevel=3)
        return None
    axis_of = {mapping[0]: 2, mapping[1]: 1, mapping[2]: 0}  # file axis holding x, y, z
    return (axis_of[3], axis_of[2], axis_of[1])


def read_volume(path: str | Path, fallback_voxel_size_angstrom: float = 1.0) -> tuple[np.ndarray, float]:
    """Read a cubic MRC volume.

    Args:
        path: the .mrc file.
        fallback_voxel_size_angstrom: voxel size used (with a warning) when the header has none.

    Returns:
        ``(volume, voxel_size_angstrom)``: a ``(D, D, D)`` float32 array ``[z, y, x]`` and the
        voxel size in Å. Non-standard axis orders (mapc/mapr/maps) are transposed to ``[z, y, x]``.
    """
    header = _read_header(path)
    shape = _data_shape(header, path)
    if len(set(shape)) != 1:
        raise InputError(path, f"volume is {shape[2]}x{shape[1]}x{shape[0]} voxels, not cubic",
                         "pad or crop it to a cube, e.g. with relion_image_handler --new_box")
    if bytes(header.map)[:3] != b"MAP":
        warnings.warn(f"{path}: header lacks the MRC map ID; reading it anyway", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            data = mrc.data
    if data is None:
        raise InputError(path, "the data block could not be read (corrupt file)")
    volume = data.reshape(shape)
    order = _axis_order(header, path)
    if order is not None:
        volume = volume.transpose(order)
    return np.ascontiguousarray(volume, dtype=np.float32), _volume_voxel_size(header, path,
                                                                             fallback_voxel_size_angstrom)


def _volume_voxel_size(header: np.recarray, path: str | Path, fallback_angstrom: float) -> float:
    """The isotropic voxel size in Å, or the fallback (with a warning) when the header lacks it."""
    voxel_size = _voxel_size_from_header(header)
    if voxel_size is None:
        warnings.warn(f"{path}: header has no voxel size; using {fallback_angstrom} Å", stacklevel=3)
        return float(fallback_angstrom)
    if not np.allclose(voxel_size, voxel_size[0], rtol=1e-3):
        raise InputError(path, f"voxel size is anisotropic: {voxel_size} Å (x, y, z)")
    return voxel_size[0]


def write_volume(path: str | Path, volume: np.ndarray, voxel_size_angstrom: float) -> None:
    """Write a cubic ``(D, D, D)`` volume ``[z, y, x]`` as a float32 MRC file, atomically.

    The header holds the voxel size in Å and, as RELION writes it, origin 0 and
    ``nxstart = nystart = nzstart = 0``: ChimeraX then shows the map in the same place as maps
    written by RELION for the same box.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"expected a cubic (D, D, D) volume, got shape {volume.shape}")
    with atomic_output(path) as temporary:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = voxel_size_angstrom
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.nstart = 0


class StackWriter:
    """Write an image stack chunk by chunk, so that stacks larger than memory can be written.

    Use as a context manager::

        with StackWriter("particles.mrcs", image_size=128, pixel_size_angstrom=1.7) as writer:
            for chunk in chunks:          # each (n, D, D)
                writer.write(chunk)

    Images are streamed to a temporary file beside ``path`` as float32 (mode 2); the header
    (image count and statistics) is completed on a clean exit and the file renamed to ``path``.
    On an exception the temporary file is removed and ``path`` is left untouched. Peak memory is
    one chunk. The header follows RELION: image-stack space group 0, origin 0.
    """

    def __init__(self, path: str | Path, image_size: int, pixel_size_angstrom: float) -> None:
        self.path = Path(path)
        self.image_size = int(image_size)
        self.pixel_size_angstrom = float(pixel_size_angstrom)
        self.n_images = 0
        self._min = np.inf
        self._max = -np.inf
        self._mean = 0.0
        self._sum_squared_deviations = 0.0

    @staticmethod
    def file_bytes(n_images: int, image_size: int) -> int:
        """Size in bytes of the stack written from ``n_images`` images of ``image_size`` x ``image_size`` px."""
        return HEADER_DTYPE.itemsize + n_images * image_size * image_size * np.dtype("<f4").itemsize

    def __enter__(self) -> StackWriter:
        self._temporary: Path = temporary_sibling(self.path)
        self._file: BinaryIO = open(self._temporary, "r+b")
        self._file.write(self._header_bytes())  # placeholder, completed at exit
        return self

    def write(self, chunk: np.ndarray) -> None:
        """Append ``(n, D, D)`` images (any real dtype; stored as float32)."""
        chunk = np.ascontiguousarray(chunk, dtype="<f4")
        if chunk.ndim != 3 or chunk.shape[1:] != (self.image_size, self.image_size):
            raise ValueError(f"expected a chunk of shape (n, {self.image_size}, {self.image_size}), "
                             f"got {chunk.shape}")
        if chunk.shape[0] == 0:
            return
        self._update_statistics(chunk)
        self._file.write(memoryview(chunk).cast("B"))

    def _update_statistics(self, chunk: np.ndarray) -> None:
        """Merge the chunk's min, max, mean and squared deviations into the running values (Chan et al.)."""
        values = chunk.astype(np.float64).ravel()
        chunk_mean = float(values.mean())
        chunk_squared_deviations = float(np.square(values - chunk_mean).sum())
        n_before, n_chunk = self.n_images * self.image_size**2, values.size
        n_after = n_before + n_chunk
        delta = chunk_mean - self._mean
        self._mean += delta * n_chunk / n_after
        self._sum_squared_deviations += chunk_squared_deviations + delta**2 * n_before * n_chunk / n_after
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        self.n_images += chunk.shape[0]

    def _header_bytes(self) -> bytes:
        """The 1024-byte little-endian MRC2014 header for the images written so far."""
        header = np.zeros((), dtype=HEADER_DTYPE.newbyteorder("<")).view(np.recarray)
        header.nx = header.ny = header.mx = header.my = self.image_size
        header.nz, header.mz = self.n_images, 1
        header.mode = 2
        header.cella = (self.pixel_size_angstrom * self.image_size,) * 2 + (self.pixel_size_angstrom,)
        header.cellb = (90.0, 90.0, 90.0)
        header.mapc, header.mapr, header.maps = 1, 2, 3
        header.ispg = _IMAGE_STACK_SPACE_GROUP
        header.map = b"MAP "
        header.machst = machine_stamp_from_byte_order("<")
        header.nversion = 20140
        if self.n_images:
            header.dmin, header.dmax, header.dmean = self._min, self._max, self._mean
            n_values = self.n_images * self.image_size**2
            header.rms = np.sqrt(self._sum_squared_deviations / n_values)
        else:
            header.dmin, header.dmax, header.dmean, header.rms = 0.0, -1.0, -2.0, -1.0
        return header.tobytes()

    def __exit__(self, exc_type: type[BaseException] | None, exc_value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        succeeded = False
        try:
            if exc_type is None:
                if self.n_images == 0:
                    raise ValueError(f"{self.path}: no images were written")
                self._file.seek(0)
                self._file.write(self._header_bytes())
                succeeded = True
        finally:
            self._file.close()
            if succeeded:
                os.replace(self._temporary, self.path)
            else:
                self._temporary.unlink(missing_ok=True)
