"""Backprojection from known poses recovers the true map of a clean simulated dataset; origin sign; bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryofire.errors import InputError
from cryofire.evaluate import fsc_metrics
from cryofire.io import read_particles, read_volume, write_star
from cryofire.reconstruct import POSE_COLUMNS, backproject_dataset
from cryofire.simulate import SimulationConfig, simulate_dataset

BOX = 32
PIXEL_SIZE = 5.0  # 160 Å / 32


@pytest.fixture(scope="module")
def clean_star(tmp_path_factory) -> Path:
    """300 nearly noise-free images of the two-state phantom, box 32."""
    config = SimulationConfig(n_images=300, box_size=BOX, snr=1e4, seed=3)
    return simulate_dataset(config, tmp_path_factory.mktemp("clean"))


def _fsc_vs_truth(volume_path: Path, star: Path) -> dict:
    volume, pixel_size = read_volume(volume_path)
    truth, _ = read_volume(star.parent / "volumes" / "average.mrc")
    assert pixel_size == pytest.approx(PIXEL_SIZE)
    return fsc_metrics(volume, truth, pixel_size)


def test_backprojection_recovers_the_true_average_map(clean_star, tmp_path):
    half_maps = backproject_dataset(clean_star, tmp_path / "map.mrc", device="cpu")
    metrics = _fsc_vs_truth(tmp_path / "map.mrc", clean_star)
    frequency_px = np.asarray(metrics["frequency_per_angstrom"]) * PIXEL_SIZE
    fsc = np.asarray(metrics["fsc"])
    assert (fsc[frequency_px <= 0.8 * 0.5] > 0.5).all(), np.round(fsc, 3)
    assert metrics["resolution_fsc0.5_angstrom"] <= PIXEL_SIZE / (0.8 * 0.5)
    # The half maps agree to the same resolution (the data are nearly noise-free).
    assert half_maps["resolution_fsc0.5_angstrom"] <= PIXEL_SIZE / (0.8 * 0.5)
    assert half_maps["nyquist_angstrom"] == pytest.approx(2 * PIXEL_SIZE)


def test_negated_origins_ruin_the_map(clean_star, tmp_path):
    """Pins the origin sign: a particle sits at minus the origin, and backprojection re-centres by +origin."""
    table = read_particles(clean_star)
    table["rlnOriginXAngst"] *= -1
    table["rlnOriginYAngst"] *= -1
    wrong_star = clean_star.parent / "negated_origins.star"
    write_star(wrong_star, table)
    backproject_dataset(wrong_star, tmp_path / "wrong.mrc", device="cpu", max_images=200)
    metrics = _fsc_vs_truth(tmp_path / "wrong.mrc", clean_star)
    frequency_px = np.asarray(metrics["frequency_per_angstrom"]) * PIXEL_SIZE
    fsc = np.asarray(metrics["fsc"])
    # Shifts of ~2-6 px scramble everything beyond ~1/4 of Nyquist (the correct map stays above 0.9 there).
    beyond = (frequency_px >= 0.25 * 0.5) & (frequency_px <= 0.8 * 0.5)
    assert np.abs(fsc[beyond]).mean() < 0.3, np.round(fsc, 3)
    assert metrics["resolution_fsc0.5_angstrom"] > 4 * PIXEL_SIZE / 0.5


def test_star_file_without_poses_is_an_input_error(clean_star, tmp_path):
    table = read_particles(clean_star).drop(columns=list(POSE_COLUMNS))
    star = clean_star.parent / "no_poses.star"
    write_star(star, table)
    with pytest.raises(InputError, match="no poses: missing column.*rlnAngleRot") as error:
        backproject_dataset(star, tmp_path / "map.mrc", device="cpu")
    assert error.value.path == str(star)
    assert not (tmp_path / "map.mrc").exists()


@pytest.mark.parametrize("size", [16, 15])
def test_fast_inserter_gives_the_same_sums_as_the_reference_backprojector(size):
    """FastInserter (Friedel half plane, padded accumulator, scatter_add) == physics.Backprojector.insert."""
    from cryofire import physics
    from cryofire.physics import FastInserter

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, size, size, generator=generator, dtype=torch.float64)
    rotations = torch.cat((torch.eye(3, dtype=torch.float64)[None],
                           physics.random_rotations(5, generator=generator, dtype=torch.float64)))
    reference = physics.Backprojector(size, dtype=torch.float64)
    fast = physics.Backprojector(size, dtype=torch.float64)
    ctf = physics.ctf_for_images(reference.padded_size, torch.full((6,), 3.0, dtype=torch.float64),
                                 dtype=torch.float64, defocus_u_angstrom=torch.linspace(8e3, 2e4, 6, dtype=torch.float64),
                                 defocus_v_angstrom=torch.linspace(7e3, 1.9e4, 6, dtype=torch.float64),
                                 defocus_angle_deg=20.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    reference.insert(images, rotations, ctf)
    inserter = FastInserter(fast)
    inserter.insert(images[:3], rotations[:3], ctf[:3])  # in two batches, as a data set is read
    inserter.insert(images[3:], rotations[3:], ctf[3:])
    inserter.flush()
    assert torch.allclose(fast.weight_sum, reference.weight_sum, atol=1e-9)
    assert torch.allclose(fast.volume_sum, reference.volume_sum, atol=1e-9)
