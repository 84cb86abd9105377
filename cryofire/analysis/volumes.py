"""Volumes from a trained hypervolume (`cryofire volume`): at given latents, at cluster centres, along a PC.

The decoder is evaluated on the full 3D Fourier grid (in chunks, on the GPU when there is one) and inverse
transformed (:meth:`cryofire.model.decoder.HyperVolume.render_volume`). At the training box D the voxel size is the
training pixel size; at another box S it is ``pixel_size * D / S``, and since the decoder knows nothing beyond the
training Nyquist frequency, a larger box interpolates the same map finely: it adds no detail. Flipping the hand
mirrors the map along z (``vol[::-1]``), for an ab initio map of the wrong handedness.

Files written to the output folder (``volumes.json`` lists them with their latents):
``z_<i>.mrc`` for each latent given, ``cluster_<i>.mrc`` for each k-means centre of `cryofire analyze`
(``centers.npy``), ``pc<p>_<j>.mrc`` along principal component p (the same points as the analysis's
``pc_trajectories.npy`` for 10 steps), and ``volume.mrc`` for a homogeneous run (zdim 0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryofire.analysis.latents import fit_pca, load_latents, pc_trajectory
from cryofire.device import resolve_device
from cryofire.errors import ConfigError, InputError
from cryofire.io import write_volume
from cryofire.io._files import atomic_output
from cryofire.model import CryoFireModel
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.infer import load_trained_model


@dataclass(frozen=True)
class VolumeRequest:
    """What to render.

    Attributes:
        latents: latents to render, each a sequence of zdim values (files z_0.mrc, z_1.mrc, ...).
        clusters: render the k-means centres of the analysis (its centers.npy).
        pc: render a trajectory along this principal component (1-based); None for none.
        steps: points of the trajectory (from the 5th to the 95th percentile of the particles).
        box_size: output box S in pixels (even); None for the training box D.
        flip_hand: mirror every volume along z.
    """

    latents: list[list[float]] = field(default_factory=list)
    clusters: bool = False
    pc: int | None = None
    steps: int = 10
    box_size: int | None = None
    flip_hand: bool = False


def render_volume(model: CryoFireModel, z: np.ndarray, box_size: int | None = None,
                  flip_hand: bool = False) -> np.ndarray:
    """(S, S, S) float32 volume ``[z, y, x]`` of latent `z` (zdim,), at box `box_size` (default: training box)."""
    latent = torch.as_tensor(np.asarray(z, np.float32))
    volume = model.decoder.render_volume(latent, box_size).cpu().numpy()
    return np.ascontiguousarray(volume[::-1] if flip_hand else volume, dtype=np.float32)


def voxel_size_angstrom(training_pixel_size_angstrom: float, training_box: int, box_size: int | None) -> float:
    """Voxel size (Å) of a volume rendered at `box_size` px from a model trained at `training_box` px."""
    return training_pixel_size_angstrom * training_box / (box_size or training_box)


def requested_latents(run_dir: Path, analysis_dir: Path, zdim: int, request: VolumeRequest) -> list[dict]:
    """One entry {file, kind, z, ...} per volume to render, in the order of the module docstring."""
    if zdim == 0:
        if request.latents or request.clusters or request.pc is not None:
            raise ConfigError("the run is homogeneous (zdim 0): --z, --clusters and --pc do not apply")
        return [{"file": "volume.mrc", "kind": "homogeneous", "z": []}]
    if not (request.latents or request.clusters or request.pc is not None):
        raise ConfigError("nothing to render: give --z, --clusters or --pc")
    entries = []
    for i, values in enumerate(request.latents):
        if len(values) != zdim:
            raise ConfigError(f"--z {' '.join(map(str, values))}: the latent has {zdim} values, not {len(values)}")
        entries.append({"file": f"z_{i}.mrc", "kind": "z", "z": [float(v) for v in values]})
    if request.clusters:
        entries += [{"file": f"cluster_{i}.mrc", "kind": "cluster", "cluster": i, "z": center.tolist()}
                    for i, center in enumerate(_cluster_centers(analysis_dir, zdim))]
    if request.pc is not None:
        latents = load_latents(run_dir)
        points, percentiles = pc_trajectory(latents, fit_pca(latents), request.pc, request.steps)
        entries += [{"file": f"pc{request.pc}_{j}.mrc", "kind": "pc", "pc": request.pc,
                     "percentile": float(p), "z": point.tolist()}
                    for j, (point, p) in enumerate(zip(points, percentiles))]
    return entries


def _cluster_centers(analysis_dir: Path, zdim: int) -> np.ndarray:
    """The (k, zdim) latents of the particles nearest the k-means centres (analysis centers.npy)."""
    path = analysis_dir / "centers.npy"
    if not path.is_file():
        raise InputError(path, "not found", "run `cryofire analyze` on the run first, or give --analysis")
    centers = np.load(path)
    if centers.ndim != 2 or centers.shape[1] != zdim:
        raise InputError(path, f"holds latents of shape {centers.shape}, the model has zdim {zdim}")
    return centers


def write_volumes(
    run_dir: str | Path,
    out_dir: str | Path,
    request: VolumeRequest,
    analysis_dir: str | Path | None = None,
    device: str = "auto",
) -> Path:
    """Render the requested volumes of a trained run as .mrc files in `out_dir`, plus volumes.json.

    `analysis_dir` (default ``run_dir/analysis``) holds the output of `cryofire analyze`. Returns volumes.json.
    """
    run_dir, out = Path(run_dir), Path(out_dir)
    if request.box_size is not None and (request.box_size < 2 or request.box_size % 2):
        raise ConfigError(f"--box {request.box_size}: the box size must be even and positive")
    model, _, _ = load_trained_model(run_dir, resolve_device(device))
    training_box = model.config.box_size
    voxel_size = voxel_size_angstrom(_training_pixel_size(run_dir), training_box, request.box_size)
    analysis = Path(analysis_dir) if analysis_dir is not None else run_dir / "analysis"
    entries = requested_latents(run_dir, analysis, model.config.zdim, request)
    out.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        volume = render_volume(model, np.asarray(entry["z"], np.float32), request.box_size, request.flip_hand)
        write_volume(out / entry["file"], volume, voxel_size)
    summary = {"run": str(run_dir.resolve()), "box_size": request.box_size or training_box,
               "training_box_size": training_box, "voxel_size_angstrom": voxel_size,
               "flip_hand": request.flip_hand, "volumes": entries}
    path = out / "volumes.json"
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(summary, indent=1))
    return path


def _training_pixel_size(run_dir: Path) -> float:
    """The pixel size (Å) of the training images, recorded in the run's weights.pt."""
    path = run_dir / "weights.pt"
    data = load_checkpoint(path).get("data", {})
    if "pixel_size_angstrom" not in data:
        raise InputError(path, "has no data.pixel_size_angstrom (written by an older cryofire?)")
    return float(data["pixel_size_angstrom"])
