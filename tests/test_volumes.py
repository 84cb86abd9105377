"""Volumes rendered from a trained run: shape, voxel size, resampling, hand flip, and the `cryofire volume` files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from cryofire import physics
from cryofire.analysis import analyze_run
from cryofire.analysis.volumes import VolumeRequest, render_volume, requested_latents, write_volumes
from cryofire.cli import main
from cryofire.errors import ConfigError, InputError
from cryofire.io import read_volume
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.train import TrainConfig, train
from cryofire.train.infer import load_trained_model

TINY_MODEL = {
    "encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32,
    "decoder_width": 32, "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2,
}
PIXEL_SIZE = 10.0  # Å, of the simulated D = 16 images


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch/BLAS: on these tiny arrays extra threads only spin (slow on a busy 2-core box)."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A run trained for one epoch on 128 simulated D = 16 images, with its analysis (k-means k = 2)."""
    folder = tmp_path_factory.mktemp("volumes")
    config = SimulationConfig(n_images=128, box_size=16, pixel_size_angstrom=PIXEL_SIZE, snr=10.0, seed=5)
    particles = simulate_dataset(config, folder / "sim")
    options = TrainConfig(epochs=1, batch_size=16, val_fraction=0.0, model=TINY_MODEL)
    run_dir = train(particles, folder / "run", options)
    analyze_run(run_dir, k=2, max_states=2)
    return run_dir


@pytest.fixture(scope="module")
def model(run):
    return load_trained_model(run, torch.device("cpu"))[0]


def test_volume_at_the_training_box_has_the_training_voxel_size(run, tmp_path):
    request = VolumeRequest(latents=[[0.0, 0.0]])
    write_volumes(run, tmp_path, request, device="cpu")
    volume, voxel_size = read_volume(tmp_path / "z_0.mrc")
    assert volume.shape == (16, 16, 16) and voxel_size == pytest.approx(PIXEL_SIZE)
    assert np.isfinite(volume).all() and volume.std() > 0


def test_a_larger_box_doubles_the_sampling_of_the_same_map(run, model, tmp_path):
    write_volumes(run, tmp_path, VolumeRequest(latents=[[0.5, -0.5]], box_size=32), device="cpu")
    fine, voxel_size = read_volume(tmp_path / "z_0.mrc")
    assert fine.shape == (32, 32, 32) and voxel_size == pytest.approx(PIXEL_SIZE / 2)
    coarse = render_volume(model, np.array([0.5, -0.5]))
    fine_ft = physics.fft3_centered(torch.from_numpy(fine.astype(np.float64))) / 2**3  # same density scale
    coarse_ft = physics.fft3_centered(torch.from_numpy(coarse.astype(np.float64)))
    # the same Fourier coefficients below the training Nyquist (the even box's Nyquist planes, index 0, aside) ...
    inner = slice(9, 24)
    assert torch.allclose(fine_ft[inner, inner, inner], coarse_ft[1:, 1:, 1:], atol=1e-5 * coarse_ft.abs().max())
    # ... and nothing beyond it: |k| in cycles per training pixel is twice the fine grid's
    beyond = physics.frequency_grid_3d(32, dtype=torch.float64).norm(dim=-1) * 2 > 0.5
    assert fine_ft[beyond].abs().max() < 1e-5 * coarse_ft.abs().max()


def test_flip_hand_mirrors_along_z(model):
    z = np.array([0.3, 0.1])
    assert np.array_equal(render_volume(model, z, flip_hand=True), render_volume(model, z)[::-1])


def test_cli_writes_cluster_and_trajectory_volumes_and_lists_them(run, tmp_path):
    out = tmp_path / "volumes"
    assert main(["volume", str(run), "-o", str(out), "--clusters", "--pc", "1", "--z", "0", "1",
                 "--flip-hand", "--device", "cpu"]) == 0
    listing = json.loads((out / "volumes.json").read_text())
    files = [entry["file"] for entry in listing["volumes"]]
    assert files == ["z_0.mrc", "cluster_0.mrc", "cluster_1.mrc"] + [f"pc1_{j}.mrc" for j in range(10)]
    assert all((out / name).exists() for name in files) and listing["flip_hand"]
    centers = np.load(run / "analysis" / "centers.npy")
    clusters = [entry["z"] for entry in listing["volumes"] if entry["kind"] == "cluster"]
    assert np.allclose(clusters, centers)
    trajectory = [entry["z"] for entry in listing["volumes"] if entry["kind"] == "pc"]
    assert np.allclose(trajectory, np.load(run / "analysis" / "pc_trajectories.npy")[0])


def test_bad_requests_raise_clear_errors(run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="has 2 values, not 3"):
        write_volumes(run, tmp_path, VolumeRequest(latents=[[0.0, 0.0, 0.0]]), device="cpu")
    with pytest.raises(ConfigError, match="nothing to render"):
        write_volumes(run, tmp_path, VolumeRequest(), device="cpu")
    with pytest.raises(InputError, match="centers.npy: not found"):
        write_volumes(run, tmp_path, VolumeRequest(clusters=True), analysis_dir=tmp_path, device="cpu")
    assert main(["volume", str(run), "-o", str(tmp_path), "--pc", "1", "--box", "15"]) == 2
    assert "--box 15" in capsys.readouterr().err


def test_a_homogeneous_model_renders_its_one_volume(tmp_path):
    from cryofire.model import CryoFireModel, ModelConfig

    model = CryoFireModel(ModelConfig(box_size=16, **{**TINY_MODEL, "zdim": 0}))
    assert render_volume(model, np.zeros(0)).shape == (16, 16, 16)
    assert requested_latents(tmp_path, tmp_path, 0, VolumeRequest()) == [
        {"file": "volume.mrc", "kind": "homogeneous", "z": []}]
    with pytest.raises(ConfigError, match="homogeneous"):
        requested_latents(tmp_path, tmp_path, 0, VolumeRequest(clusters=True))
