"""Images simulated from class maps (the encoder's unlimited training images): conventions, noise, training."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cryofire import physics
from cryofire.errors import ConfigError
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.image_formation import observed_spectrum
from cryofire.model.map_images import simulator_from_assignment
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.simulate.dataset import ImageModel, draw_metadata
from cryofire.train import TrainConfig, train
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.data import CTF_PARAMETER_COLUMNS, ctf_from_parameters
from cryofire.train.loop import Trainer

SIZE = 24


@pytest.fixture(scope="module")
def clean_data() -> dict:
    """600 noiseless D=24 images of one state, their true rotations, shifts (px), CTF parameters."""
    config = SimulationConfig(n_images=600, box_size=SIZE, pixel_size_angstrom=160 / SIZE, shift_std_px=1.5,
                              state_weights=[1.0, 0.0], seed=5)
    table = draw_metadata(config)
    images = ImageModel(config, table).clean_images(np.arange(len(table))).float()
    rotations = physics.euler_to_matrix(
        *(torch.tensor(table[c].to_numpy()) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))).float()
    origins = torch.tensor(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float32))
    shifts = origins / config.pixel_size_angstrom
    parameters = torch.tensor(table[list(CTF_PARAMETER_COLUMNS)].to_numpy(np.float32))
    return {"images": images, "rotations": rotations, "shifts": shifts, "ctf_parameters": parameters}


def _simulator(data: dict, images: torch.Tensor):
    em = StochasticEM(SIZE, 0, EMConfig(classes=1))
    window = physics.soft_circular_window(SIZE, 0.85, 0.99).float()
    count = em.lattice.count_within(SIZE / 2)
    observed = observed_spectrum(images * window, em.lattice, count)
    ctf = em.lattice.gather(ctf_from_parameters(data["ctf_parameters"], SIZE), count)
    classes = torch.zeros(len(images), dtype=torch.long)
    simulator = simulator_from_assignment(em, observed, ctf, data["rotations"], data["shifts"], classes,
                                          data["ctf_parameters"], float(window.square().mean()))
    return simulator, window


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean((-2, -1), keepdim=True), b - b.mean((-2, -1), keepdim=True)
    return float(((a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))).median())


def test_images_from_maps_of_the_true_poses_reproduce_the_data(clean_data):
    """Maps rebuilt from noiseless images at their true poses, sliced at those poses with their CTFs and shifts,
    give the images back (rotation, shift sign, CTF and scale conventions all agree; the amplitude up to the
    shrinkage of the maps' Wiener filter); with the shifts' sign flipped they do not."""
    simulator, window = _simulator(clean_data, clean_data["images"])
    n = 100
    args = (clean_data["rotations"][:n], clean_data["shifts"][:n], clean_data["ctf_parameters"][:n],
            torch.zeros(n, dtype=torch.long))
    simulated = simulator.images(*args)
    real = clean_data["images"][:n]
    assert _correlation(simulated * window, real * window) > 0.97
    amplitude = float((simulated * real * window).sum() / (real.square() * window).sum())
    assert 0.8 < amplitude <= 1.0
    flipped = simulator.images(args[0], -args[1], *args[2:])
    assert _correlation(flipped * window, real * window) < 0.85


def test_the_simulated_noise_has_the_datas_spectrum(clean_data):
    """White noise of variance s^2 added to the data: the residuals at the true poses estimate it (s^2 mean(w^2) per
    coefficient of a windowed spectrum), and the simulated raw images carry noise of variance s^2 per pixel."""
    sigma = float(clean_data["images"].std())
    noise = torch.randn(clean_data["images"].shape, generator=torch.Generator().manual_seed(0))
    simulator, window = _simulator(clean_data, clean_data["images"] + sigma * noise)
    window_power = float(window.square().mean())
    radius = physics.frequency_grid_2d(SIZE).norm(dim=-1) * SIZE
    beyond_the_particle = radius >= 4  # the lowest shells hold the maps' own errors too
    estimated = simulator.noise_amplitude.square()[beyond_the_particle] * window_power
    assert float(estimated.mean()) == pytest.approx(sigma**2 * window_power, rel=0.1)

    drawn = simulator.draw(400, torch.Generator().manual_seed(1))
    assert drawn.images.shape == (400, SIZE, SIZE) and drawn.rotations.shape == (400, 3, 3)
    assert torch.equal(simulator.draw(400, torch.Generator().manual_seed(1)).images, drawn.images)
    clean = simulator.images(drawn.rotations, drawn.shifts_px, drawn.ctf_parameters, drawn.classes)
    assert float((drawn.images - clean).var()) == pytest.approx(sigma**2, rel=0.1)
    quieter = simulator.draw(400, torch.Generator().manual_seed(1), noise_scale=0.5)
    assert float((quieter.images - clean).var()) == pytest.approx(0.25 * sigma**2, rel=0.1)


SMALL_MODEL = {"encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32, "decoder_width": 32,
               "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2}


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> str:
    config = SimulationConfig(n_images=128, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return str(simulate_dataset(config, tmp_path_factory.mktemp("sim")))


def test_simulated_images_without_the_em_teacher_are_refused():
    with pytest.raises(ConfigError, match="--simulated-batch-size needs the em teacher"):
        TrainConfig(search_fraction=1.0, teacher="search", simulated_batch_size=8)
    with pytest.raises(ConfigError, match="simulated_noise_ramp"):
        TrainConfig(search_fraction=1.0, teacher="em", simulated_batch_size=8, simulated_noise_ramp=1.5)


def test_training_with_simulated_images_resumes_exactly(particles, tmp_path):
    """The "em" teacher's simulated images join every step (the encoder's rotation error is logged as usual), and a
    run killed after its first epoch resumes to the same weights: the maps are rebuilt from the checkpointed poses,
    each step's images come from a generator seeded by the step, and their noise ramp (over half the run, past the
    kill) from the images seen. The encoder turns its images to their axes (in-plane canonical) and re-centres
    them."""
    model = {**SMALL_MODEL, "encoder_inplane_canonical": True, "encoder_recentre": True}
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=1e-3, search_fraction=1.0, model=model, teacher="em",
                         em_iterations=20, em_starts=1, em_classes=1, simulated_batch_size=8, simulated_noise_ramp=0.5)
    uninterrupted = train(particles, tmp_path / "full", replace(config, log_every_steps=1))
    records = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train_loss"]) for r in records if r["event"] == "epoch")
    # 3 epochs x 128 images: the noise rises from 0.1 to 1 over the first 192 images, logged with each step
    ramp = [(r["images_seen"], r["simulated_noise_scale"]) for r in records if r["event"] == "step"]
    assert ramp[0] == (16, pytest.approx(0.1 + 0.9 * 16 / 192)) and ramp[-1] == (384, 1.0)
    assert [scale for _, scale in ramp] == sorted(scale for _, scale in ramp)
    partial = Trainer(particles, tmp_path / "resumed", replace(config))
    partial.config.epochs = 1
    partial.fit()
    resumed = train(particles, tmp_path / "resumed", config, resume=True)
    a = load_checkpoint(uninterrupted / "weights.pt")["model"]
    b = load_checkpoint(resumed / "weights.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    without = train(particles, tmp_path / "without", replace(config, simulated_batch_size=0))
    c = load_checkpoint(without / "weights.pt")["model"]
    assert not torch.equal(a["encoder.rotation_head.weight"], c["encoder.rotation_head.weight"])
