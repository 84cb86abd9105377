"""The volumes of a report: the index written by `cryofire volume`, 2D views of a map, and their figures.

Views follow docs/conventions.md (``vol[z, y, x]``): a central slice or a projection (sum) along one axis, and a
depth-shaded surface rendering: the first voxel at or above the contour level along each ray through the rotated
map, lit by the map's gradient there (Lambert shading) and darkened with depth. It stands in for an isosurface
rendering without a mesh library. Images are drawn with origin='lower', so the first named axis points right and
the second up (x right, y up for a view along z), as in ChimeraX's default view.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from cryofire.report.figures import styled

RENDER_BOX = 128  # the surface rendering resamples maps to about this many voxels per side
CONTOUR_SIGMAS = 2.5  # default contour level: mean + this many standard deviations of the voxel values
_VIEW_TILT_DEG = (-30.0, 30.0)  # rotations about x, then y, of the rendered map (an oblique view)
_TO_LIGHT = np.array([-0.8, 0.4, -0.45])  # (z, y, x) towards the light: the viewer looks along +z, +y is up


@dataclass
class VolumeEntry:
    """One volume listed by `cryofire volume`.

    Attributes:
        path: the .mrc file.
        kind: what it is ('cluster', 'pc', ...), as the index says.
        label: a short name for captions.
        z: the latent it was decoded from, when known.
        trajectory: the principal component (1-based) of a trajectory volume, else None.
        info: the index entry as written.
    """

    path: Path
    kind: str
    label: str
    z: list[float] | None = None
    trajectory: int | None = None
    info: dict = field(default_factory=dict)


def _trajectory_number(entry: dict, name: str) -> int | None:
    """The principal component of a trajectory volume: the entry's "pc", else a number after "pc" in its kind or
    file name when the kind says trajectory or PC; None for other volumes."""
    if isinstance(entry.get("pc"), (int, float)):
        return int(entry["pc"])
    kind = str(entry.get("kind", "")).lower()
    if "pc" not in kind and "traj" not in kind:
        return None
    match = re.search(r"pc_?(\d+)", f"{kind} {name}", flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def read_volume_index(folder: Path) -> list[VolumeEntry]:
    """The volumes listed in `folder`/volumes.json (a list of entries, or {"volumes": [...]}), files that exist."""
    payload = json.loads((Path(folder) / "volumes.json").read_text())
    entries = payload.get("volumes", []) if isinstance(payload, dict) else payload
    volumes = []
    for entry in entries:
        if not isinstance(entry, dict) or "file" not in entry:
            raise ValueError(f"{folder / 'volumes.json'}: every entry needs a 'file'")
        path = Path(folder) / str(entry["file"])
        label = str(entry.get("label") or entry.get("name") or path.stem)
        z = entry.get("z")
        volumes.append(VolumeEntry(path=path, kind=str(entry.get("kind", "volume")), label=label,
                                   z=list(np.ravel(z).astype(float)) if z is not None else None,
                                   trajectory=_trajectory_number(entry, path.name), info=entry))
    return volumes


def contour_level(volume: np.ndarray) -> float:
    """A display threshold: mean + CONTOUR_SIGMAS standard deviations of the voxel values (density units)."""
    return float(volume.mean() + CONTOUR_SIGMAS * volume.std())


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The central sections normal to z, y and x, each an image ``img[row, column]`` = (y, x), (z, x), (z, y)."""
    nz, ny, nx = volume.shape
    return [volume[nz // 2], volume[:, ny // 2, :], volume[:, :, nx // 2]]


def projections(volume: np.ndarray) -> list[np.ndarray]:
    """Sums along z, y and x, same image layout as :func:`central_slices`."""
    return [volume.sum(axis=axis) for axis in range(3)]


def resample(volume: np.ndarray, box: int) -> np.ndarray:
    """The map with about `box` voxels per side: averages of f^3 blocks for a larger map (the smallest integer f
    giving a side <= box, a remainder cropped), trilinear upsampling by an integer factor up to 4 for a smaller
    one (for smoother surfaces)."""
    factor = int(np.ceil(max(volume.shape) / box))
    if factor <= 1:
        zoom = min(4, box // max(volume.shape))
        return ndimage.zoom(volume, zoom, order=1, grid_mode=True, mode="nearest") if zoom > 1 else volume
    nz, ny, nx = (side // factor for side in volume.shape)
    cropped = volume[: nz * factor, : ny * factor, : nx * factor]
    return cropped.reshape(nz, factor, ny, factor, nx, factor).mean(axis=(1, 3, 5))


def _oblique(volume: np.ndarray) -> np.ndarray:
    """The map rotated about x then y by _VIEW_TILT_DEG, same box (linear interpolation, zero outside)."""
    turned = ndimage.rotate(volume, _VIEW_TILT_DEG[0], axes=(0, 1), reshape=False, order=1)
    return ndimage.rotate(turned, _VIEW_TILT_DEG[1], axes=(0, 2), reshape=False, order=1)


def surface_rendering(volume: np.ndarray, level: float, color: tuple[float, float, float] = (0.8, 0.8, 0.8)
                      ) -> np.ndarray:
    """Depth-shaded surface of ``volume >= level`` seen obliquely: (D, D, 4) RGBA image, transparent background.

    Brightness = (0.25 + 0.75 * Lambert term) * (1 - 0.5 * depth / D) times `color` (RGB in 0..1); rows are y
    (shown with origin='lower', y points up), columns x. The map is first resampled to about RENDER_BOX voxels.
    """
    view = _oblique(resample(np.asarray(volume, np.float32), RENDER_BOX))
    inside = view >= level
    depth = np.argmax(inside, axis=0)
    gradient = np.stack(np.gradient(view))
    normal = -np.take_along_axis(gradient, depth[None, None], axis=1)[:, 0]
    normal /= np.maximum(np.linalg.norm(normal, axis=0), 1e-12)
    lambert = np.clip(np.einsum("c,cyx->yx", _TO_LIGHT / np.linalg.norm(_TO_LIGHT), normal), 0.0, 1.0)
    shade = (0.25 + 0.75 * lambert) * (1.0 - 0.5 * depth / view.shape[0])
    image = np.zeros((*shade.shape, 4))
    image[..., :3] = shade[..., None] * np.asarray(color)[None, None]
    image[..., 3] = inside.any(axis=0)
    return image


def bounding_square(images: list[np.ndarray], margin: float = 0.08) -> tuple[slice, slice]:
    """(rows, columns) of the smallest square, plus a margin, holding the opaque pixels of all RGBA `images`."""
    opaque = np.any([image[..., 3] > 0 for image in images], axis=0)
    size = opaque.shape[0]
    if not opaque.any():
        return slice(0, size), slice(0, opaque.shape[1])
    rows, columns = np.nonzero(opaque)
    centre = ((rows.min() + rows.max()) / 2, (columns.min() + columns.max()) / 2)
    half = (max(rows.max() - rows.min(), columns.max() - columns.min()) / 2 + 1) * (1 + 2 * margin)
    low = [int(np.clip(round(c - half), 0, size)) for c in centre]
    high = [int(np.clip(round(c + half), 0, size)) for c in centre]
    return slice(low[0], high[0]), slice(low[1], high[1])


# (horizontal, vertical) axes of the images of central_slices/projections, normal to z, y and x.
_IMAGE_AXES = (("x", "y"), ("x", "z"), ("y", "z"))
_NORMALS = ("z", "y", "x")


def _show(ax, image: np.ndarray, axes: tuple[str, str] | None, title: str, limits: tuple | None = None) -> None:
    vmin, vmax = limits if limits else (None, None)
    ax.imshow(image, origin="lower", cmap="gray", vmin=vmin, vmax=vmax, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.spines[:].set_visible(False)
    ax.set_title(title, fontsize=8.5, pad=3)
    if axes:
        ax.set_xlabel(f"{axes[0]} →", fontsize=7.5, labelpad=1)
        ax.set_ylabel(f"{axes[1]} →", fontsize=7.5, labelpad=1)


def _rendered(volumes: list[np.ndarray], level: float, color: tuple[float, float, float]) -> list[np.ndarray]:
    """Surface renderings of `volumes` at one level, cropped to one square around all of them."""
    images = [surface_rendering(volume, level, color) for volume in volumes]
    rows, columns = bounding_square(images)
    return [image[rows, columns] for image in images]


@styled
def volume_panel(volume: np.ndarray, color: tuple[float, float, float], level: float | None = None) -> Figure:
    """A state volume: its surface rendering (left), central slices (top row) and projections (bottom row)."""
    level = contour_level(volume) if level is None else level
    figure = Figure(figsize=(9.6, 3.9))
    grid = figure.add_gridspec(2, 4, width_ratios=(1.55, 1, 1, 1), wspace=0.12, hspace=0.28)
    _show(figure.add_subplot(grid[:, 0]), _rendered([volume], level, color)[0], None,
          f"surface at level {level:.3g} (oblique view)")
    for column, (image, axes, normal) in enumerate(zip(central_slices(volume), _IMAGE_AXES, _NORMALS), 1):
        _show(figure.add_subplot(grid[0, column]), image, axes, f"central slice ⊥ {normal}")
    for column, (image, axes, normal) in enumerate(zip(projections(volume), _IMAGE_AXES, _NORMALS), 1):
        _show(figure.add_subplot(grid[1, column]), image, axes, f"projection along {normal}")
    return figure


def _common_limits(images: list[np.ndarray]) -> tuple[float, float]:
    stacked = np.stack(images)
    return float(np.percentile(stacked, 0.5)), float(np.percentile(stacked, 99.8))


@styled
def trajectory_strip(volumes: list[np.ndarray], column_titles: list[str], color: tuple[float, float, float]
                     ) -> Figure:
    """Volumes along a trajectory, one per column: projections along z and x, and the surface (rows).

    Each row shares one grey scale, and the surfaces one level (that of the middle volume), so changes along the
    trajectory show as changes in the images.
    """
    rows = {
        "projection along z": [projections(v)[0] for v in volumes],
        "projection along x": [projections(v)[2] for v in volumes],
        "surface": _rendered(volumes, contour_level(volumes[len(volumes) // 2]), color),
    }
    figure = Figure(figsize=(1.05 * len(volumes) + 0.9, 3.5))
    grid = figure.add_gridspec(3, len(volumes), wspace=0.05, hspace=0.12)
    for row, (name, images) in enumerate(rows.items()):
        limits = _common_limits(images) if name != "surface" else None
        for column, image in enumerate(images):
            ax = figure.add_subplot(grid[row, column])
            _show(ax, image, None, column_titles[column] if row == 0 else "", limits)
            if column == 0:
                ax.set_ylabel(name.replace("projection ", "projection\n"), fontsize=7.5)
    return figure
