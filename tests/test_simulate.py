"""The simulator: the hinged phantom, and simulated datasets with their ground truth and conventions."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryofire import physics
from cryofire.errors import ConfigError
from cryofire.io import ImageSource, read_particles, read_volume
from cryofire.simulate import SimulationConfig, build_phantom, conformations, simulate_dataset
from cryofire.simulate.dataset import DEFAULT_BOX_ANGSTROM

ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
SEED = 7
OVERSAMPLING = 3  # interpolation error ~(r / (3 D))^2: 0.7% here, 1.3% at 2


def _images(star: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The particle table of a star file and all its images as float64 (N, D, D)."""
    table = read_particles(star)
    return table, ImageSource(table)[np.arange(len(table))].astype(np.float64)


def _poses(table: pd.DataFrame) -> torch.Tensor:
    return physics.euler_to_matrix(*(torch.tensor(table[c].to_numpy(np.float64)) for c in ANGLES))


def _ctf(table: pd.DataFrame, size: int) -> torch.Tensor:
    """CTF of every row from the star file's own columns (B, D, D)."""
    column = lambda name: torch.tensor(table[name].to_numpy(np.float64))  # noqa: E731
    return physics.ctf_for_images(
        size, column("rlnImagePixelSize"), defocus_u_angstrom=column("rlnDefocusU"),
        defocus_v_angstrom=column("rlnDefocusV"), defocus_angle_deg=column("rlnDefocusAngle"),
        voltage_kv=column("rlnVoltage"), cs_mm=column("rlnSphericalAberration"),
        amplitude_contrast=column("rlnAmplitudeContrast"), phase_shift_deg=column("rlnPhaseShift"),
        bfactor_angstrom2=column("rlnCtfBfactor"),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """60 images, box 32, three stacks (25 + 25 + 10)."""
    config = SimulationConfig(n_images=60, box_size=32, snr=0.5, seed=SEED, images_per_stack=25)
    return simulate_dataset(config, tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def snr_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same box-16 dataset (same seed) at SNR 0.5 and at SNR 1e10 (noise-free for all purposes)."""
    root = tmp_path_factory.mktemp("snr")
    stars = []
    for name, snr in (("noisy", 0.5), ("clean", 1e10)):
        config = SimulationConfig(n_images=100, box_size=16, snr=snr, seed=SEED)
        stars.append(simulate_dataset(config, root / name))
    return stars[0], stars[1]


# --- the phantom ----------------------------------------------------------------------------------------------------
def test_phantom_is_deterministic():
    first, second = build_phantom(), build_phantom()
    np.testing.assert_array_equal(first.atoms_angstrom, second.atoms_angstrom)
    np.testing.assert_array_equal(first.moving, second.moving)
    assert 0 < first.moving.sum() < first.n_atoms
    np.testing.assert_allclose(first.atoms_angstrom.mean(axis=0), 0.0, atol=1e-9)  # centred in the box


def test_hinge_turns_only_the_arm_rigidly_about_its_axis():
    phantom = build_phantom()
    angle = 35.0
    rest, turned = conformations(phantom, np.array([0.0, angle]))
    np.testing.assert_allclose(rest, phantom.atoms_angstrom, atol=1e-12)
    body, arm = ~phantom.moving, phantom.moving
    np.testing.assert_array_equal(turned[body], phantom.atoms_angstrom[body])
    # Independent rotation (scipy, right hand) of the arm about the hinge line.
    turn = Rotation.from_rotvec(np.deg2rad(angle) * phantom.hinge_axis)
    expected = turn.apply(phantom.atoms_angstrom[arm] - phantom.hinge_point_angstrom) + phantom.hinge_point_angstrom
    np.testing.assert_allclose(turned[arm], expected, atol=1e-9)
    assert np.linalg.norm(turned[arm] - rest[arm], axis=1).min() > 1.0  # every arm atom really moves


def test_every_conformation_fits_inside_the_default_box_at_any_pose():
    phantom = build_phantom()
    positions = conformations(phantom, np.linspace(0.0, 90.0, 10))
    radius = np.linalg.norm(positions, axis=-1).max()
    atom_sigma = max(2.0, DEFAULT_BOX_ANGSTROM / 64)  # default width at the default box of 64 px
    # Within the inscribed sphere (any rotation keeps it in the box) with 3 sigma of each atom to spare.
    assert radius + 3 * atom_sigma < DEFAULT_BOX_ANGSTROM / 2


# --- simulate_dataset: files and ground truth -----------------------------------------------------------------------
def test_star_file_holds_true_poses_origins_ctf_and_classes(dataset):
    table = read_particles(dataset)
    assert len(table) == 60
    for column in (*ANGLES, "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV",
                   "rlnDefocusAngle", "rlnClassNumber"):
        assert column in table.columns, column
    text = dataset.read_text()
    assert "data_optics" in text and "data_particles" in text  # RELION 3.1
    assert "hinge_deg" not in table.columns
    np.testing.assert_array_equal(table["rlnImagePixelSize"], DEFAULT_BOX_ANGSTROM / 32)
    assert (table["rlnImageSize"] == 32).all() and (table["rlnVoltage"] == 300.0).all()
    assert table["rlnAngleTilt"].between(0, 180).all() and table["rlnAngleRot"].between(-180, 180).all()
    defocus_um = table["rlnDefocusU"] / 1e4
    assert defocus_um.between(1.0, 2.5).all()
    assert (table["rlnDefocusV"] <= table["rlnDefocusU"]).all()
    assert set(table["rlnClassNumber"]) == {1, 2}
    origins_px = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 5.0
    assert 0.5 < origins_px.std() < 4.0 and np.abs(origins_px).max() <= 6.0 + 1e-9  # std 2 px, clipped at 3 std


def test_stacks_are_split_as_asked_and_readable(dataset):
    table, images = _images(dataset)
    stacks = sorted((dataset.parent / "stacks").glob("particles_*.mrcs"))
    assert [s.name for s in stacks] == ["particles_0000.mrcs", "particles_0001.mrcs", "particles_0002.mrcs"]
    assert table["image_path"].value_counts().sort_index().tolist() == [25, 25, 10]
    assert table["image_index"].tolist() == [*range(25), *range(25), *range(10)]
    assert images.shape == (60, 32, 32) and np.isfinite(images).all()
    assert images.std(axis=(1, 2)).min() > 0


def test_volumes_latents_and_truth_json(dataset):
    folder = dataset.parent
    truth = json.loads((folder / "truth.json").read_text())
    assert truth["config"]["n_images"] == 60 and truth["config"]["seed"] == SEED and truth["config"]["snr"] == 0.5
    assert truth["volumes"] == ["state_1.mrc", "state_2.mrc"] and truth["average_volume"] == "average.mrc"
    assert truth["noise_std"] > 0
    (state_1, pixel_size), (state_2, _), (average, _) = (
        read_volume(folder / "volumes" / name) for name in ("state_1.mrc", "state_2.mrc", "average.mrc"))
    assert state_1.shape == (32, 32, 32) and pixel_size == pytest.approx(5.0)
    # A sum of unit-peak Gaussians of sigma 1 px integrates to n_atoms * (2 pi)^(3/2) over the box.
    n_atoms = build_phantom().n_atoms
    for state in (state_1, state_2):
        assert state.sum(dtype=np.float64) == pytest.approx(n_atoms * (2 * math.pi) ** 1.5, rel=1e-4)
    assert np.abs(state_1 - state_2).max() > 0.3 * state_1.max()  # the arm moved
    classes = read_particles(dataset)["rlnClassNumber"].to_numpy()
    n_1, n_2 = (classes == 1).sum(), (classes == 2).sum()
    np.testing.assert_allclose(average, (n_1 * state_1 + n_2 * state_2) / (n_1 + n_2), atol=1e-5)
    latents = np.load(folder / "true_latents.npy")
    assert latents.shape == (60, 1) and latents.dtype == np.float32
    np.testing.assert_array_equal(latents[:, 0], np.where(classes == 1, 0.0, 35.0))  # hinge angle of each state


def test_snr_is_the_requested_variance_ratio(snr_pair):
    noisy_star, clean_star = snr_pair
    _, noisy = _images(noisy_star)
    _, clean = _images(clean_star)
    noise = noisy - clean  # the same seed draws the same particles, CTFs and noise pattern
    noise_std = json.loads((noisy_star.parent / "truth.json").read_text())["noise_std"]
    assert noise.std() == pytest.approx(noise_std, rel=0.02)  # 25,600 samples: ~0.5% sampling error
    assert abs(noise.mean()) < 0.03 * noise_std
    assert clean.var() / noise.var() == pytest.approx(0.5, rel=0.04)
    assert clean.var() / noise_std**2 == pytest.approx(0.5, rel=1e-3)  # the definition over the whole box


def test_state_populations_follow_state_weights(tmp_path):
    config = SimulationConfig(n_images=2000, box_size=8, snr=1.0, seed=SEED, state_weights=[1.0, 3.0])
    classes = read_particles(simulate_dataset(config, tmp_path))["rlnClassNumber"].to_numpy()
    assert (classes == 1).mean() == pytest.approx(0.25, abs=0.03)  # binomial std 0.01
    assert set(classes) == {1, 2}


def test_more_state_weights_than_phantom_states_is_a_config_error():
    with pytest.raises(ConfigError, match="state_weights"):
        SimulationConfig(n_images=10, box_size=16, state_weights=[0.3, 0.3, 0.4])


def test_continuous_mode_writes_hinge_volumes_matching_the_discrete_states(tmp_path, snr_pair):
    config = SimulationConfig(n_images=50, box_size=16, snr=1.0, seed=SEED, heterogeneity="continuous")
    star = simulate_dataset(config, tmp_path)
    table = read_particles(star)
    assert "rlnClassNumber" not in table.columns
    names = sorted(p.name for p in (tmp_path / "volumes").glob("*.mrc"))
    assert names == ["average.mrc", "hinge_000.0deg.mrc", "hinge_008.8deg.mrc", "hinge_017.5deg.mrc",
                     "hinge_026.2deg.mrc", "hinge_035.0deg.mrc"]
    latents = np.load(tmp_path / "true_latents.npy")[:, 0]
    assert latents.min() >= 0.0 and latents.max() <= 35.0 and latents.std() > 5.0  # uniform on [0, 35]: std 10
    # The ends of the hinge are the two discrete states of the bimodal dataset at the same box.
    discrete = snr_pair[1].parent / "volumes"
    for hinge, state in (("hinge_000.0deg.mrc", "state_1.mrc"), ("hinge_035.0deg.mrc", "state_2.mrc")):
        np.testing.assert_allclose(read_volume(tmp_path / "volumes" / hinge)[0], read_volume(discrete / state)[0],
                                   atol=1e-5)


def test_clean_images_are_ctf_times_shifted_projections_of_the_true_volumes(tmp_path):
    """Pins pose, origin sign and CTF of the simulator against the physics layer (docs/conventions.md)."""
    config = SimulationConfig(n_images=12, box_size=32, pixel_size_angstrom=6.0, snr=1e10, shift_std_px=1.0,
                              seed=SEED)
    table, images = _images(simulate_dataset(config, tmp_path))
    images = torch.from_numpy(images)
    volumes = [torch.tensor(read_volume(tmp_path / "volumes" / f"state_{s}.mrc")[0], dtype=torch.float64)
               for s in (1, 2)]
    poses = _poses(table)
    origin_px = torch.tensor(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()) / 6.0
    states = table["rlnClassNumber"].to_numpy() - 1
    assert set(states) == {0, 1}

    def projections(rotations: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(images)
        for state, volume in enumerate(volumes):
            pick = torch.from_numpy(np.flatnonzero(states == state))
            out[pick] = physics.project_volume(volume, rotations[pick], oversampling=OVERSAMPLING)
        return out

    def predicted(projected: torch.Tensor, shift_px: torch.Tensor, ctf_sign: float = 1.0) -> torch.Tensor:
        spectra = physics.phase_shift_2d(physics.fft2_centered(projected), shift_px) * ctf_sign * _ctf(table, 32)
        return physics.ifft2_centered(spectra).real

    def relative_error(prediction: torch.Tensor) -> torch.Tensor:
        return (prediction - images).norm(dim=(1, 2)) / images.norm(dim=(1, 2))

    projected = projections(poses)
    # The particle sits at minus the origin: content moved by -origin.
    assert relative_error(predicted(projected, -origin_px)).max() < 0.02
    # Each convention broken on its own is caught.
    assert relative_error(predicted(projected, +origin_px)).median() > 0.3
    assert relative_error(predicted(projected, -origin_px, ctf_sign=-1.0)).median() > 1.5
    assert relative_error(predicted(projections(poses.transpose(1, 2)), -origin_px)).median() > 0.3


def test_rerun_reuses_finished_stacks_and_a_changed_setting_rewrites_them(tmp_path):
    config = SimulationConfig(n_images=30, box_size=16, snr=1.0, seed=SEED, images_per_stack=10)
    simulate_dataset(config, tmp_path)
    stacks = sorted((tmp_path / "stacks").glob("*.mrcs"))
    assert len(stacks) == 3
    old_ns = 1_000_000_000 * 10**9  # 2001: any rewrite gives a newer time
    for stack in stacks:
        os.utime(stack, ns=(old_ns, old_ns))
    before = [stack.read_bytes() for stack in stacks]

    simulate_dataset(SimulationConfig(**{**config.__dict__}), tmp_path)
    assert [stack.stat().st_mtime_ns for stack in stacks] == [old_ns] * 3, "finished stacks were rewritten"
    assert len(ImageSource(read_particles(tmp_path / "particles.star"))) == 30

    simulate_dataset(SimulationConfig(**{**config.__dict__, "snr": 2.0}), tmp_path)
    assert all(stack.stat().st_mtime_ns != old_ns for stack in stacks), "stale stacks kept after a setting changed"
    assert all(stack.read_bytes() != old for stack, old in zip(stacks, before))
    assert json.loads((tmp_path / "truth.json").read_text())["config"]["snr"] == 2.0
