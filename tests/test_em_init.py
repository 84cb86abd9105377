"""The classical ab initio that teaches the encoder: its slice/insert pair, refinement, frames, and both teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryofire import physics
from cryofire.evaluate import rotation_errors_deg
from cryofire.io import read_star
from cryofire.model.em_init import (
    EMConfig,
    StochasticEM,
    align_to_first_class,
    in_first_class_frame,
    insert_slices,
    refine,
    sample_slices,
)
from cryofire.model.image_formation import observed_spectrum
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.simulate.dataset import ImageModel, draw_metadata
from cryofire.train import TrainConfig, train
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.data import CTF_PARAMETER_COLUMNS, ctf_from_parameters


def test_insert_is_the_adjoint_of_the_trilinear_slice():
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(3, 12, 12, 12, generator=generator)
    points = (torch.rand(4, 30, 3, generator=generator) - 0.5) * 10
    values = torch.randn(4, 30, 3, generator=generator)
    left = (sample_slices(grid, points) * values).sum()
    right = (grid * insert_slices(values, points, 12)).sum()
    assert torch.allclose(left, right, rtol=1e-5)


def test_refinement_from_perturbed_poses_recovers_them():
    """Maps rebuilt from poses 10 deg off, then local searches, bring SNR-1 images of one state close to the truth."""
    size, n_images = 24, 400
    config = SimulationConfig(n_images=n_images, box_size=size, pixel_size_angstrom=160 / size, snr=1.0,
                              shift_std_px=1.0, state_weights=[1.0, 0.0], seed=2)
    table = draw_metadata(config)
    images = ImageModel(config, table).clean_images(np.arange(n_images)).float()
    images += torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * images.std()
    truth = physics.euler_to_matrix(
        *(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).float()
    origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float32)
    shifts = torch.tensor(origins) / config.pixel_size_angstrom
    em = StochasticEM(size, n_images, EMConfig(classes=1))
    count = em.lattice.count_within(size / 2)
    observed = observed_spectrum(images * physics.soft_circular_window(size, 0.85, 0.99).float(), em.lattice, count)
    parameters = torch.tensor(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32))
    ctf = em.lattice.gather(ctf_from_parameters(parameters, size), count)
    noise = torch.randn(n_images, 3, generator=torch.Generator().manual_seed(1))
    rotations = physics.axis_angle_to_matrix(noise * np.deg2rad(10.0) / np.sqrt(3)).float() @ truth
    start = np.median(rotation_errors_deg(rotations.double().numpy(), truth.double().numpy()))
    classes = torch.zeros(n_images, dtype=torch.long)
    for radius in (6, 9, 12):
        rotations, shifts, classes = refine(em, observed, ctf, rotations, shifts, classes, radius, global_rotations=0)
    end = np.median(rotation_errors_deg(rotations.double().numpy(), truth.double().numpy()))
    assert start > 7.0 and end < 0.5 * start


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(n_images=128, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return str(simulate_dataset(config, folder))


def test_training_with_the_em_teacher_logs_its_targets(particles, tmp_path):
    model = {"encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32, "decoder_width": 32,
             "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2}
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, model=model, search_fraction=1.0,
                         teacher="em", em_iterations=20)
    run = train(particles, tmp_path / "run", config)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    searches = [r for r in records if r["event"] == "search"]
    assert len(searches) == 1 and sum(searches[0]["em_class_sizes"]) == 128
    assert 0.0 <= searches[0]["target_rotation_error_median_deg"] <= 180.0
    # taught for the whole run: poses.star holds the teacher's poses (RELION angles of its matrices)
    teacher = load_checkpoint(run / "checkpoint.pt")["teacher"]
    written = read_star(run / "poses.star", allow_absolute_paths=True)
    angles = [torch.tensor(written[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    matrices = physics.euler_to_matrix(*angles).float()
    assert torch.allclose(matrices, teacher["rotations"], atol=1e-4)


def test_poses_of_a_class_in_a_rotated_frame_are_re_expressed_in_the_first():
    """Images whose class-1 poses live in a frame turned by 12 degrees get their true poses back."""
    size, n_images = 16, 60
    config = SimulationConfig(n_images=n_images, box_size=size, pixel_size_angstrom=10.0, snr=10.0, shift_std_px=0.0,
                              state_weights=[1.0, 0.0], seed=4)
    table = draw_metadata(config)
    model = ImageModel(config, table)
    em = StochasticEM(size, n_images, EMConfig(classes=2, max_shift_px=0.0))
    padded = torch.nn.functional.pad(model.true_volume(state=0).float(), (size // 2,) * 6)
    em.volume_ft[0] = physics.fft3_centered(padded).to(torch.complex64) / size
    count = em.lattice.count_within(size / 2)
    observed = observed_spectrum(model.clean_images(np.arange(n_images)).float(), em.lattice, count)
    parameters = torch.tensor(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32))
    ctf = em.lattice.gather(ctf_from_parameters(parameters, size), count)
    truth = physics.euler_to_matrix(
        *(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).float()
    turn = physics.axis_angle_to_matrix(torch.tensor([0.1, -0.15, 0.12]))  # 12 degrees
    classes = torch.ones(n_images, dtype=torch.long)

    alignments = align_to_first_class(em, observed, ctf, truth @ turn, torch.zeros(n_images, 2), classes, 6)
    back = in_first_class_frame(truth @ turn, classes, alignments)
    assert np.median(rotation_errors_deg(back.double().numpy(), truth.double().numpy())) < 2.0


def test_training_with_the_search_teacher_logs_its_searches(particles, tmp_path):
    model = {"encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32, "decoder_width": 32,
             "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2}
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=1e-3, model=model, search_fraction=0.5,
                         teacher="search", search_rotations=256)
    run = train(particles, tmp_path / "run", config)
    searches = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"search"' in line]
    assert len(searches) >= 1 and all(0.0 <= r["target_rotation_error_median_deg"] <= 180.0 for r in searches)
