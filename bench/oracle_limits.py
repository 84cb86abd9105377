"""What the simulated images allow at best (issue 3): classification and pose information with the TRUE maps.

    python bench/oracle_limits.py [--sim /work/bench-data/acc32/sim] [--n 1000]

1. Confusion of the oracle classifier: each noisy image is compared with the clean images of both true states at its
   true pose, CTF and shift; the smaller residual wins (the Bayes classifier for white noise). Also after Fourier
   cropping to 32, 24 and 16 px (what a D=32 training run sees, and less).
2. Pose information: the expected log-likelihood drop ``|P(R') - P(R)|^2 / (2 sigma^2)`` when the true rotation is
   perturbed by delta degrees about a random axis; for a quadratic drop ``dLL = delta^2 / (2 s^2)`` the pose
   estimate's standard deviation per axis is ``s = delta / sqrt(2 dLL)``.
Results in bench/RESULTS.md ("Ab initio by stochastic EM").
"""
import argparse
import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryofire import physics
from cryofire.simulate.dataset import ImageModel, SimulationConfig, draw_metadata

SIZES = (64, 32, 24, 16)  # the simulated box and the Fourier crops compared
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


def spectra(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centred spectra (B, size, size) of images (B, D, D), Fourier-cropped to ``size``."""
    return physics.fourier_crop2(physics.fft2_centered(images.double()), size)


def squared_distance(a: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    """Sum of squares (B,) of a - b in real-space units (Parseval), within the ``size`` crop."""
    return (spectra(a, size) - spectra(b, size)).abs().square().sum((-2, -1)) / a.shape[-1] ** 2


def clean_at(model: ImageModel, rows: pd.DataFrame) -> torch.Tensor:
    """Noise-free images (B, D, D) of a metadata table, 500 at a time."""
    model.table = rows
    return torch.cat([model.clean_images(np.arange(i, min(i + 500, len(rows)))) for i in range(0, len(rows), 500)])


def oracle_confusion(model: ImageModel, table: pd.DataFrame, noisy: torch.Tensor, hinges: tuple) -> None:
    n = len(noisy)
    labels = table["rlnClassNumber"].to_numpy()[:n] - 1
    clean = [clean_at(model, table.iloc[:n].assign(hinge_deg=hinge)) for hinge in hinges]
    for size in SIZES:
        residuals = [squared_distance(noisy, images, size) for images in clean]
        wrong = ((residuals[1] < residuals[0]).numpy().astype(int) != labels).mean()
        print(f"box {size}: oracle confusion {100 * wrong:.2f} % ({n} images)")


def pose_information(model: ImageModel, table: pd.DataFrame, noise_std: float, n: int = 300) -> None:
    base = table.iloc[:n]
    rotations = physics.euler_to_matrix(*(torch.tensor(base[c].to_numpy()) for c in ANGLES))
    reference = clean_at(model, base)
    rng = np.random.default_rng(0)
    for delta_deg in (1.0, 2.0, 4.0, 8.0):
        axis = torch.from_numpy(rng.normal(size=(n, 3)))
        axis = axis / axis.norm(dim=1, keepdim=True)
        turned = rotations @ physics.axis_angle_to_matrix(axis * np.deg2rad(delta_deg))
        perturbed = base.copy()
        for column, values in zip(ANGLES, physics.matrix_to_euler(turned)):
            perturbed[column] = values.numpy()
        images = clean_at(model, perturbed)
        for size in (64, 32, 16):
            drop = (squared_distance(images, reference, size) / (2 * noise_std**2)).numpy()
            print(f"delta {delta_deg} deg, box {size}: expected log-likelihood drop median {np.median(drop):.1f}, "
                  f"10th percentile {np.percentile(drop, 10):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", type=Path, default=Path("/work/bench-data/acc32/sim"),
                        help="a `cryofire simulate` output folder (bimodal phantom)")
    parser.add_argument("--n", type=int, default=1000, help="images to classify")
    args = parser.parse_args()
    truth = json.loads((args.sim / "truth.json").read_text())
    config = SimulationConfig(**{**truth["config"], "hinge_range_deg": tuple(truth["config"]["hinge_range_deg"])})
    table = draw_metadata(config)  # the same draws as the simulation (same seed)
    model = ImageModel(config, table)
    with mrcfile.mmap(args.sim / "stacks" / "particles_0000.mrcs", permissive=True) as stack:
        noisy = torch.from_numpy(np.array(stack.data[: args.n], dtype=np.float32))
    oracle_confusion(model, table, noisy, config.hinge_range_deg)
    pose_information(model, table, truth["noise_std"])


if __name__ == "__main__":
    main()
