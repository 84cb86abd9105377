"""Homogeneous reconstruction by Fourier backprojection from known poses, with half-map FSC.

The standard sanity check of a dataset's poses, CTF and conventions: particles are re-centred by their
origins, backprojected with CTF weighting (Wiener-like division) into two half-maps (even and odd rows), and the
half-maps' FSC gives the resolution. The full map combines both halves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cryofire import physics
from cryofire.device import resolve_device
from cryofire.errors import ConfigError, InputError
from cryofire.evaluate import fsc_metrics
from cryofire.io import ImageSource, read_particles, write_volume
from cryofire.physics import FastInserter

POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def batch_physics(rows: pd.DataFrame, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pose matrices (B, 3, 3) and origins in pixels (B, 2), float32, and CTF keyword arguments (float64 tensors,
    so the CTF is computed in double precision)."""
    column = lambda name: torch.tensor(rows[name].to_numpy(np.float64), device=device, dtype=torch.float64)  # noqa: E731
    rotations = physics.euler_to_matrix(column("rlnAngleRot"), column("rlnAngleTilt"), column("rlnAnglePsi")).float()
    pixel_size = column("rlnImagePixelSize")
    origin_px = (torch.stack([column("rlnOriginXAngst"), column("rlnOriginYAngst")], dim=-1) / pixel_size[:, None]).float()
    ctf_args = dict(
        pixel_size_angstrom=pixel_size,
        defocus_u_angstrom=column("rlnDefocusU"), defocus_v_angstrom=column("rlnDefocusV"),
        defocus_angle_deg=column("rlnDefocusAngle"), voltage_kv=column("rlnVoltage"),
        cs_mm=column("rlnSphericalAberration"), amplitude_contrast=column("rlnAmplitudeContrast"),
        phase_shift_deg=column("rlnPhaseShift"), bfactor_angstrom2=column("rlnCtfBfactor"),
    )
    return rotations, origin_px, ctf_args


def backproject_dataset(
    particles_path: str | Path,
    out_path: str | Path,
    datadir: str | Path | None = None,
    allow_absolute_paths: bool = False,
    max_images: int | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> dict:
    """Reconstruct `out_path` (.mrc) from a star/cs file with poses; returns the half-map FSC metrics."""
    for option, value in (("--batch-size", batch_size), ("--max-images", max_images)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, not {value}")
    table = read_particles(particles_path, datadir=datadir, allow_absolute_paths=allow_absolute_paths)
    missing = [c for c in POSE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(particles_path, f"no poses: missing column(s) {', '.join(missing)}",
                         "backprojection needs rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst")
    if max_images:
        table = table.iloc[:max_images].reset_index(drop=True)
    source = ImageSource(table)
    torch_device = resolve_device(device)
    halves = [physics.Backprojector(source.image_size, device=torch_device) for _ in range(2)]
    inserters = [FastInserter(half) for half in halves]
    with tqdm(total=len(source), desc="backprojecting", unit="img", mininterval=2.0) as progress:
        for indices, images in source.iter_batches(batch_size):
            rows = table.iloc[indices]
            rotations, origin_px, ctf_args = batch_physics(rows, source.image_size, torch_device)
            pixels = physics.shift_images(torch.from_numpy(images).to(torch_device), origin_px)
            ctf = inserters[0].ctf_at_pixels(**ctf_args)
            for parity, inserter in enumerate(inserters):
                pick = torch.from_numpy(np.flatnonzero(indices % 2 == parity)).to(torch_device)
                inserter.insert(pixels[pick], rotations[pick], ctf[pick])
            progress.update(len(indices))
    for inserter in inserters:
        inserter.flush()
    half_maps = [half.reconstruct().cpu().numpy() for half in halves]
    full = physics.reconstruct_from_sums(
        halves[0].volume_sum + halves[1].volume_sum, halves[0].weight_sum + halves[1].weight_sum
    )
    volume = physics.crop_centered(full, source.image_size, ndim=3).cpu().numpy()
    pixel_size = float(table["rlnImagePixelSize"].iloc[0])
    write_volume(out_path, volume, pixel_size)
    return fsc_metrics(half_maps[0], half_maps[1], pixel_size)
