"""Metrics against ground truth: global pose alignment (rotation and hand), class confusion, FSC, common box."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryofire import physics
from cryofire.evaluate import (align_poses, common_box, confusion, fsc_metrics, pose_metrics, poses_from_table,
                               rotation_errors_deg)

HAND = np.diag([1.0, 1.0, -1.0])
N = 1000
PIXEL_SIZE = 2.5


def _random_rotations(n: int, seed: int) -> np.ndarray:
    return Rotation.random(n, random_state=seed).as_matrix()


def _table(poses: np.ndarray, origins_px: np.ndarray | None = None, pixel_size: float = PIXEL_SIZE) -> pd.DataFrame:
    """A particle table holding RELION Euler angles of `poses` and origins (given in pixels, stored in Å)."""
    rot, tilt, psi = (a.numpy() for a in physics.matrix_to_euler(torch.from_numpy(poses)))
    origins_px = np.zeros((len(poses), 2)) if origins_px is None else origins_px
    return pd.DataFrame({"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
                         "rlnOriginXAngst": origins_px[:, 0] * pixel_size,
                         "rlnOriginYAngst": origins_px[:, 1] * pixel_size, "rlnImagePixelSize": pixel_size})


@pytest.fixture(scope="module")
def true_poses() -> np.ndarray:
    return _random_rotations(N, seed=0)


@pytest.fixture(scope="module")
def global_rotation() -> np.ndarray:
    return Rotation.from_rotvec([0.4, -1.1, 2.0]).as_matrix()


def test_table_round_trip_is_exact(true_poses):
    """The helper itself: Euler angles written to the table give back the same matrices."""
    np.testing.assert_allclose(poses_from_table(_table(true_poses)), true_poses, atol=1e-9)


def test_global_rotation_is_recovered_with_zero_error(true_poses, global_rotation):
    pred = true_poses @ global_rotation
    alignment = align_poses(pred, true_poses)
    assert not alignment.mirrored_hand
    np.testing.assert_allclose(alignment.rotation, global_rotation.T, atol=1e-6)  # pred @ Q^T = true
    assert rotation_errors_deg(alignment.apply(pred), true_poses).max() < 1e-4
    metrics = pose_metrics(_table(pred), _table(true_poses))
    assert metrics["rotation_error_median_deg"] < 1e-4 and metrics["rotation_error_p90_deg"] < 1e-4
    assert metrics["mirrored_hand"] is False and metrics["n_images"] == N
    np.testing.assert_allclose(metrics["global_rotation"], global_rotation.T, atol=1e-6)


def test_mirrored_hand_is_detected_with_zero_error(true_poses, global_rotation):
    pred = HAND @ (true_poses @ global_rotation) @ HAND  # poses of the mirror-image map, in another frame
    assert np.allclose(np.linalg.det(pred), 1.0)  # still proper rotations
    alignment = align_poses(pred, true_poses)
    assert alignment.mirrored_hand
    np.testing.assert_allclose(alignment.rotation, global_rotation.T, atol=1e-6)
    metrics = pose_metrics(_table(pred), _table(true_poses))
    assert metrics["mirrored_hand"] is True and metrics["rotation_error_median_deg"] < 1e-4
    # Without the hand flip the same poses cannot be aligned.
    assert np.median(rotation_errors_deg(pred @ alignment.rotation, true_poses)) > 30.0


def test_isotropic_pose_noise_gives_the_maxwell_median_error(true_poses, global_rotation):
    """Rotation vectors with i.i.d. N(0, s^2) components have angles of Maxwell law, median 1.5382 s."""
    sigma_deg = 4.0
    noise = Rotation.from_rotvec(np.random.default_rng(1).normal(0.0, np.deg2rad(sigma_deg), (N, 3))).as_matrix()
    pred = true_poses @ noise @ global_rotation
    metrics = pose_metrics(_table(pred), _table(true_poses))
    maxwell_median = 1.5381722 * sigma_deg
    assert metrics["rotation_error_median_deg"] == pytest.approx(maxwell_median, rel=0.06)  # sampling error ~2%
    assert metrics["mirrored_hand"] is False
    np.testing.assert_allclose(metrics["global_rotation"], global_rotation.T, atol=np.deg2rad(0.5))


def test_shift_error_is_the_distance_in_pixels(true_poses):
    true_origins = np.random.default_rng(2).normal(0.0, 3.0, (N, 2))
    metrics = pose_metrics(_table(true_poses, true_origins + [3.0, -4.0]), _table(true_poses, true_origins))
    assert metrics["shift_error_median_px"] == pytest.approx(5.0)
    assert metrics["shift_error_mean_px"] == pytest.approx(5.0)


def test_shift_error_compares_angstroms_across_pixel_sizes(true_poses):
    """Predictions on a 2x downsampled stack against the full-size truth: errors in pixels of the truth."""
    true_origins = np.random.default_rng(2).normal(0.0, 3.0, (N, 2))
    same = pose_metrics(_table(true_poses, true_origins / 2, 2 * PIXEL_SIZE), _table(true_poses, true_origins))
    assert same["shift_error_median_px"] == pytest.approx(0.0, abs=1e-9)
    off = pose_metrics(_table(true_poses, (true_origins + [3.0, -4.0]) / 2, 2 * PIXEL_SIZE),
                       _table(true_poses, true_origins))
    assert off["shift_error_median_px"] == pytest.approx(5.0)


def test_a_map_offset_is_found_and_removed_from_the_shift_errors(true_poses, global_rotation):
    """Poses of a map in another frame whose particle sits at t from the box centre: every origin moves by
    -(P t)_xy (a blob at t projects to (P t)_xy: tests/test_projection.py); 10 % of the images are outliers."""
    rng = np.random.default_rng(3)
    pred = true_poses @ global_rotation.T  # the predicted map's frame
    offset_px = np.array([1.5, -2.0, 2.5])
    true_origins = rng.normal(0.0, 3.0, (N, 2))
    noise = rng.normal(0.0, 0.1, (N, 2))
    pred_origins = true_origins - (pred @ offset_px)[:, :2] + noise
    outliers = rng.choice(N, N // 10, replace=False)
    pred_origins[outliers] = rng.normal(0.0, 3.0, (N // 10, 2))
    metrics = pose_metrics(_table(pred, pred_origins), _table(true_poses, true_origins))
    np.testing.assert_allclose(metrics["map_offset_angstrom"], offset_px * PIXEL_SIZE, atol=0.02 * PIXEL_SIZE)
    assert metrics["shift_error_median_px"] > 2.0  # as given: dominated by the offset
    rayleigh_median = 1.1774 * 0.1  # |noise| of the 90 % inliers; the outliers push the median up a little
    assert rayleigh_median < metrics["shift_error_aligned_median_px"] < 1.3 * rayleigh_median


def test_without_an_offset_the_aligned_shift_error_is_the_shift_error(true_poses):
    true_origins = np.random.default_rng(2).normal(0.0, 3.0, (N, 2))
    noise = np.random.default_rng(4).normal(0.0, 0.5, (N, 2))
    metrics = pose_metrics(_table(true_poses, true_origins + noise), _table(true_poses, true_origins))
    assert np.linalg.norm(metrics["map_offset_angstrom"]) < 0.05 * PIXEL_SIZE
    assert metrics["shift_error_aligned_median_px"] == pytest.approx(metrics["shift_error_median_px"], rel=0.05)


def test_confusion_is_zero_for_permuted_labels():
    true = np.repeat([1, 2, 3], [50, 30, 20])
    pred = np.array([7, 4, 9])[true - 1]  # other names, same partition
    result = confusion(pred, true)
    assert result["confusion_rate"] == 0.0
    assert result["true_classes"] == [1, 2, 3] and result["predicted_classes"] == [4, 7, 9]
    assert np.sort(np.asarray(result["matrix"]).sum(axis=1)).tolist() == [20, 30, 50]


def test_confusion_is_the_fraction_of_flipped_labels():
    rng = np.random.default_rng(3)
    true = rng.integers(0, 2, 1000)
    flipped = rng.choice(1000, 130, replace=False)
    pred = 1 - true  # the two names swapped ...
    pred[flipped] = true[flipped]  # ... and 13% of the images in the wrong class
    assert confusion(pred, true)["confusion_rate"] == pytest.approx(0.13)


def test_fsc_metrics_of_a_copy_with_negated_high_shells():
    """Shells 0..7 kept and 8.. negated: FSC steps from +1 to -1 between 7/32 and 8/32 cycles/px.

    (Zeroing the shells would not do: FSC is scale-free, so shells holding only round-off are arbitrary.)
    """
    size = 32
    reference = np.random.default_rng(4).normal(size=(size, size, size))
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(reference)))
    k = np.arange(size) - size // 2
    shell = np.round(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    copy = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(np.where(shell <= 7, spectrum, -spectrum)))).real
    metrics = fsc_metrics(copy, reference, PIXEL_SIZE)
    fsc = np.asarray(metrics["fsc"])
    np.testing.assert_allclose(fsc[:8], 1.0, atol=1e-9)
    np.testing.assert_allclose(fsc[8:], -1.0, atol=1e-9)
    np.testing.assert_allclose(metrics["frequency_per_angstrom"], np.arange(16) / size / PIXEL_SIZE)
    # Linear interpolation between (7/32, +1) and (8/32, -1).
    assert metrics["resolution_fsc0.5_angstrom"] == pytest.approx(PIXEL_SIZE * size / (7 + 0.5 / 2))
    assert metrics["resolution_fsc0.143_angstrom"] == pytest.approx(PIXEL_SIZE * size / (7 + 0.857 / 2))
    assert metrics["nyquist_angstrom"] == 2 * PIXEL_SIZE
    identical = fsc_metrics(reference, reference, PIXEL_SIZE)
    assert identical["resolution_fsc0.5_angstrom"] == pytest.approx(2 * PIXEL_SIZE)  # never drops: Nyquist


def _gaussian(size: int, sigma_px: float, centre_px: tuple[float, float, float]) -> np.ndarray:
    k = np.arange(size) - size // 2
    z, y, x = np.meshgrid(k, k, k, indexing="ij")
    return np.exp(-((x - centre_px[0]) ** 2 + (y - centre_px[1]) ** 2 + (z - centre_px[2]) ** 2) / (2 * sigma_px**2))


def test_common_box_crops_the_larger_map_to_the_smaller_box():
    """The same Gaussian (3 px at 32, 1.5 px at 16, same physical box) becomes the same 16-px map, either order."""
    large = _gaussian(32, 3.0, (2.0, -2.0, 1.0))
    small = _gaussian(16, 1.5, (1.0, -1.0, 0.5))
    cropped, untouched = common_box(large, small)
    assert cropped.shape == untouched.shape == (16, 16, 16)
    np.testing.assert_allclose(untouched, small, atol=1e-12)
    # Spectrum beyond the crop exp(-2 pi^2 3^2 / 4^2) ~ 2e-5; spatial tail at the small box's edge ~ 2e-5.
    np.testing.assert_allclose(cropped, small, atol=1e-4)
    untouched_2, cropped_2 = common_box(small, large)
    np.testing.assert_allclose(cropped_2, cropped, atol=1e-12)
    np.testing.assert_allclose(untouched_2, small, atol=1e-12)
    same_a, same_b = common_box(large, large)
    assert same_a.shape == (32, 32, 32) and np.allclose(same_a, large, atol=1e-12)


def test_state_fsc_pairs_each_cluster_map_with_its_matched_true_state(tmp_path):
    """Cluster 0 holds the true state 2 and cluster 1 the true state 1: each map is compared with its own state."""
    import json

    from cryofire.evaluate import state_fsc_metrics
    from cryofire.io import write_volume

    rng = np.random.default_rng(0)
    state_1, state_2 = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
    (tmp_path / "volumes").mkdir()
    write_volume(tmp_path / "volumes" / "state_1.mrc", state_1, 4.0)
    write_volume(tmp_path / "volumes" / "state_2.mrc", state_2, 4.0)
    (tmp_path / "truth.json").write_text(json.dumps({"volumes": ["state_1.mrc", "state_2.mrc"]}))
    run = tmp_path / "run"
    run.mkdir()
    write_volume(run / "cluster_0.mrc", state_2, 4.0)
    write_volume(run / "cluster_1.mrc", state_1, 4.0)
    entries = [{"file": f"cluster_{i}.mrc", "kind": "cluster", "cluster": i} for i in (0, 1)]
    (run / "volumes.json").write_text(json.dumps({"volumes": entries}))

    matched = state_fsc_metrics(str(run / "volumes.json"), str(tmp_path / "truth.json"), [[0, 2], [1, 1]])
    assert [(m["cluster"], m["true_class"]) for m in matched] == [(0, 2), (1, 1)]
    assert all(min(m["fsc"]) > 0.999 for m in matched)
    swapped = state_fsc_metrics(str(run / "volumes.json"), str(tmp_path / "truth.json"), [[0, 1], [1, 2]])
    assert all(abs(np.mean(m["fsc"][1:])) < 0.2 for m in swapped)  # independent noise: FSC ~ 0


def _resampled(volume: torch.Tensor, matrix: torch.Tensor, translation_px: torch.Tensor) -> torch.Tensor:
    """``V'(x) = V(M (x - v))`` (x, y, z voxel offsets from the centre), trilinear."""
    from cryofire.model.trilinear import sample_slices, voxel_offsets

    size = volume.shape[-1]
    points = voxel_offsets(size)
    return sample_slices(volume[None], ((points - translation_px) @ matrix.T)[None])[0, :, 0].reshape(volume.shape)


def test_an_ab_initio_map_is_moved_into_the_truths_frame_before_its_fsc():
    """A map whose poses match the truth only as ``H P H Q`` (other hand, turned, and moved 1.3 px) projects like the
    truth at the matching poses, and after ``volume_in_true_frame`` its FSC with the truth is that of a copy turned
    there and back (the same two trilinear interpolations)."""
    from cryofire.evaluate import PoseAlignment, volume_in_true_frame
    from cryofire.simulate import SimulationConfig
    from cryofire.simulate.dataset import ImageModel, draw_metadata

    size = 32
    config = SimulationConfig(n_images=4, box_size=size, pixel_size_angstrom=160 / size, seed=1)
    truth = ImageModel(config, draw_metadata(config)).true_volume(state=0).float()
    q = torch.from_numpy(_random_rotations(1, 3)[0]).float()
    hand = torch.from_numpy(HAND).float()
    predicted = _resampled(truth, q.T @ hand, torch.zeros(3))  # V_pred(x) = V_true(Q^T H x)
    true_poses = torch.from_numpy(_random_rotations(4, 4)).float()
    predicted_poses = hand @ true_poses @ q.T @ hand  # so that H P H Q = A
    seen, expected = physics.project_volume(predicted, predicted_poses), physics.project_volume(truth, true_poses)
    assert (seen - expected).norm() < 0.1 * expected.norm()

    moved = _resampled(truth, q.T @ hand, torch.tensor([1.0, -0.6, 0.5]))
    alignment = PoseAlignment(q.double().numpy(), mirrored_hand=True)
    aligned = volume_in_true_frame(moved.numpy(), truth.numpy(), alignment)
    there_and_back = _resampled(predicted, hand @ q, torch.zeros(3))  # the same two interpolations, exact turns
    copy = fsc_metrics(there_and_back.numpy(), truth.numpy(), 5.0)
    fitted = fsc_metrics(aligned, truth.numpy(), 5.0)
    assert fitted["resolution_fsc0.5_angstrom"] <= 1.1 * copy["resolution_fsc0.5_angstrom"]
    assert fsc_metrics(moved.numpy(), truth.numpy(), 5.0)["resolution_fsc0.5_angstrom"] > 30.0
