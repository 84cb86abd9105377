"""Metrics against ground truth: rotation and shift errors, FSC, and class confusion.

Ab initio poses are defined up to a global rotation of the map and up to its hand, so rotation errors are
measured after the best global alignment, trying both hands: predicted poses `P_i` are compared with the true
`A_i` as `H P_i H Q` with `H = diag(1, 1, -1)` (mirror hand) or `H = I`, and one rotation `Q` for all images.
Likewise its origin: a map whose particle sits at `t` (Å) from the box centre moves every origin by `-(P_i t)_xy`, so
shift errors are also given after removing the best such `t` (:func:`fit_map_offset`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment

from cryofire import physics
from cryofire.errors import ConfigError

_ANCHORS = 64
_SEARCH_IMAGES = 20_000
_HAND_FLIP = np.diag([1.0, 1.0, -1.0])


def poses_from_table(table: pd.DataFrame) -> np.ndarray:
    """RELION pose matrices (N, 3, 3) from rlnAngleRot/Tilt/Psi (degrees)."""
    angles = [torch.tensor(table[c].to_numpy(np.float64)) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    return physics.euler_to_matrix(*angles).numpy()


def rotation_errors_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic angle between matching rotations of (N, 3, 3) stacks, degrees."""
    trace = np.einsum("nij,nij->n", a, b)
    return np.rad2deg(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def _project_to_so3(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _best_alignment(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, float]:
    """Global Q minimising the median error of pred @ Q vs true: anchors, then inlier least squares."""
    rng = np.random.default_rng(0)
    anchors = rng.choice(len(pred), size=min(_ANCHORS, len(pred)), replace=False)
    candidates = np.einsum("nji,njk->nik", pred[anchors], true[anchors])  # Q_a = P_a^T A_a
    medians = [np.median(rotation_errors_deg(pred @ q, true)) for q in candidates]
    q = candidates[int(np.argmin(medians))]
    for _ in range(5):
        errors = rotation_errors_deg(pred @ q, true)
        inliers = errors <= max(2.0 * np.median(errors), 5.0)
        q = _project_to_so3(np.einsum("nji,njk->ik", pred[inliers], true[inliers]))
    return q, float(np.median(rotation_errors_deg(pred @ q, true)))


@dataclass
class PoseAlignment:
    """The global transform taking predicted poses to the true frame: true ~ hand @ pred @ hand @ rotation."""

    rotation: np.ndarray
    mirrored_hand: bool

    def apply(self, pred: np.ndarray) -> np.ndarray:
        hand = _HAND_FLIP if self.mirrored_hand else np.eye(3)
        return hand @ pred @ hand @ self.rotation


def align_poses(pred: np.ndarray, true: np.ndarray, hands: tuple[bool, ...] = (False, True)) -> PoseAlignment:
    """Best global rotation and hand (among ``hands``: mirrored or not), found on up to 20,000 images."""
    rng = np.random.default_rng(1)
    subset = rng.choice(len(pred), size=min(_SEARCH_IMAGES, len(pred)), replace=False)
    best = None
    for mirrored in hands:
        hand = _HAND_FLIP if mirrored else np.eye(3)
        q, median = _best_alignment(hand @ pred[subset] @ hand, true[subset])
        if best is None or median < best[0]:
            best = (median, PoseAlignment(q, mirrored))
    return best[1]


def fit_map_offset(rotations: np.ndarray, origin_differences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map's global offset that best explains predicted-minus-true origins, and the shift errors it leaves.

    A map translated by ``t`` (its particle at ``t`` from the box centre, in the map's own frame) projects at pose
    ``P`` to an image translated by ``(P t)_xy`` (Fourier slice theorem, RELION convention), so every origin moves by
    ``-(P t)_xy``. ``t`` is fitted by least squares over the inliers (residual within twice the median), five rounds.

    Args:
        rotations: (N, 3, 3) predicted RELION pose matrices (the frame the offset is expressed in).
        origin_differences: (N, 2) predicted minus true origins (x, y), any length unit.

    Returns:
        The offset ``t`` (3,) and the length of each residual origin difference (N,), in the unit of
        ``origin_differences``.
    """
    design = -rotations[:, :2, :]  # (N, 2, 3): origin change per unit of offset
    inliers = np.ones(len(rotations), dtype=bool)
    for _ in range(5):
        offset = np.linalg.lstsq(design[inliers].reshape(-1, 3), origin_differences[inliers].reshape(-1), rcond=None)[0]
        distances = np.linalg.norm(origin_differences - design @ offset, axis=1)
        inliers = distances <= 2.0 * np.median(distances)
    return offset, distances


def pose_metrics(pred_table: pd.DataFrame, true_table: pd.DataFrame) -> dict:
    """Rotation (degrees, after alignment) and shift (pixels of the true table; as given, and after removing the map's
    global offset, ``map_offset_angstrom``) errors of matching rows."""
    pred, true = poses_from_table(pred_table), poses_from_table(true_table)
    alignment = align_poses(pred, true)
    errors = rotation_errors_deg(alignment.apply(pred), true)
    # Compared in Å, reported in pixels of the true dataset: the two tables may differ in pixel size
    # (predictions on a downsampled stack against the full-size truth).
    columns = ["rlnOriginXAngst", "rlnOriginYAngst"]
    differences = pred_table[columns].to_numpy(np.float64) - true_table[columns].to_numpy(np.float64)
    true_pixel_size = true_table["rlnImagePixelSize"].to_numpy(np.float64)
    shift_errors = np.linalg.norm(differences, axis=1) / true_pixel_size
    offset, aligned_distances = fit_map_offset(pred, differences)
    aligned_shift_errors = aligned_distances / true_pixel_size
    return {
        "rotation_error_median_deg": float(np.median(errors)),
        "rotation_error_mean_deg": float(np.mean(errors)),
        "rotation_error_p90_deg": float(np.percentile(errors, 90)),
        "mirrored_hand": alignment.mirrored_hand,
        "global_rotation": alignment.rotation.tolist(),
        "shift_error_median_px": float(np.median(shift_errors)),
        "shift_error_mean_px": float(np.mean(shift_errors)),
        "shift_error_aligned_median_px": float(np.median(aligned_shift_errors)),
        "map_offset_angstrom": offset.tolist(),
        "n_images": int(len(errors)),
    }


def fsc_metrics(volume: np.ndarray, reference: np.ndarray, pixel_size_angstrom: float) -> dict:
    """FSC curve and the resolutions (Å) where it crosses 0.5 and 0.143."""
    freq, fsc = physics.fourier_shell_correlation(torch.tensor(volume, dtype=torch.float64),
                                                  torch.tensor(reference, dtype=torch.float64))
    result = {"frequency_per_angstrom": (freq / pixel_size_angstrom).tolist(), "fsc": fsc.tolist()}
    for name, threshold in (("resolution_fsc0.5_angstrom", 0.5), ("resolution_fsc0.143_angstrom", 0.143)):
        cutoff = float(physics.resolution_at(freq, fsc, threshold))
        result[name] = pixel_size_angstrom / cutoff if cutoff > 0 else float("inf")
    result["nyquist_angstrom"] = 2.0 * pixel_size_angstrom
    return result


def common_box(volume: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fourier-crop the larger of two volumes (same physical box) to the smaller one's size."""
    size = min(volume.shape[-1], reference.shape[-1])
    crop = lambda v: physics.downsample_volume(torch.from_numpy(np.array(v, np.float64)), size).numpy()  # noqa: E731
    return crop(volume), crop(reference)


def confusion(pred_labels: np.ndarray, true_labels: np.ndarray) -> dict:
    """Fraction of images misassigned after the best one-to-one matching of predicted to true classes."""
    pred_ids, pred_index = np.unique(pred_labels, return_inverse=True)
    true_ids, true_index = np.unique(true_labels, return_inverse=True)
    counts = np.zeros((len(pred_ids), len(true_ids)), dtype=np.int64)
    np.add.at(counts, (pred_index, true_index), 1)
    rows, cols = linear_sum_assignment(-counts)
    matched = counts[rows, cols].sum()
    return {
        "confusion_rate": float(1.0 - matched / len(true_labels)),
        "matching": [[pred_ids[r].item(), true_ids[c].item()] for r, c in zip(rows, cols)],
        "matrix": counts.tolist(),
        "predicted_classes": pred_ids.tolist(),
        "true_classes": true_ids.tolist(),
    }


def same_frame(pose: dict, tolerance_deg: float = 2.0) -> bool:
    """True when the predicted poses need no global rotation or hand flip to match the truth (e.g. fixed poses)."""
    angle = rotation_errors_deg(np.asarray(pose["global_rotation"])[None], np.eye(3)[None])[0]
    return not pose["mirrored_hand"] and angle <= tolerance_deg


def volume_in_true_frame(volume: np.ndarray, reference: np.ndarray, alignment: PoseAlignment) -> np.ndarray:
    """A predicted map (D, D, D) moved into the truth's frame, for an FSC against ``reference`` (same box).

    Poses ``true ~ H P H Q`` (:class:`PoseAlignment`) mean ``V_true(p) = V_pred(H Q p)`` (p voxel offsets (x, y, z)
    from the centre); the map is resampled so (trilinear), then superposed on the reference by a small rigid fit
    (:func:`cryofire.model.superpose.fit_rigid_part`): the translation of an ab initio map is as free as its
    rotation, and the pose alignment leaves a residual of a degree or so.
    """
    from cryofire.model.superpose import fit_rigid_part
    from cryofire.model.trilinear import sample_slices, voxel_offsets

    size = volume.shape[-1]
    hand = _HAND_FLIP if alignment.mirrored_hand else np.eye(3)
    turn = torch.from_numpy(hand @ alignment.rotation).float()
    points = voxel_offsets(size)
    moved = sample_slices(torch.from_numpy(np.ascontiguousarray(volume)).float()[None], (points @ turn.T)[None])
    moved = moved[0, :, 0].reshape(size, size, size)
    target = torch.from_numpy(np.ascontiguousarray(reference)).float()
    rotation, translation = fit_rigid_part(target, moved, torch.Generator().manual_seed(0), keep_fraction=1.0,
                                           radius_px=0.85 * size / 2, angle_deg=4.0, passes=2)
    fitted = sample_slices(moved[None], (points @ rotation.T + translation)[None])[0, :, 0]
    return fitted.reshape(size, size, size).numpy()


def state_fsc_metrics(volumes_json: str, truth_json: str, matching: list[list[int]],
                      alignment: PoseAlignment | None = None) -> list[dict]:
    """FSC of each cluster map (`cryofire volume --clusters`, volumes.json) against the true state it matches.

    `matching` pairs predicted cluster ids with true classes (1-based, as rlnClassNumber), from :func:`confusion`;
    with the `alignment` of ab initio poses to the truth each map is first moved into the truth's frame
    (:func:`volume_in_true_frame`).
    """
    from pathlib import Path

    from cryofire.io import read_volume

    volumes_index, truth = json.loads(Path(volumes_json).read_text()), json.loads(Path(truth_json).read_text())
    clusters = {v["cluster"]: v["file"] for v in volumes_index["volumes"] if v["kind"] == "cluster"}
    results = []
    for cluster, true_class in matching:
        if cluster not in clusters or not 1 <= true_class <= len(truth["volumes"]):
            continue
        predicted, pixel_size = read_volume(Path(volumes_json).parent / clusters[cluster])
        reference, _ = read_volume(Path(truth_json).parent / "volumes" / truth["volumes"][true_class - 1])
        predicted, reference = common_box(predicted, reference)
        if alignment is not None:
            predicted = volume_in_true_frame(predicted, reference, alignment)
        results.append({"cluster": cluster, "true_class": true_class, **fsc_metrics(predicted, reference, pixel_size)})
    return results


def evaluate_files(
    true_star: str | None = None,
    pred_star: str | None = None,
    true_labels: str | None = None,
    pred_labels: str | None = None,
    volume: str | None = None,
    true_volume: str | None = None,
    volumes_json: str | None = None,
    truth_json: str | None = None,
) -> dict:
    """All metrics the given files allow (poses, classes, FSC), as one JSON-able dict."""
    from cryofire.io import read_star, read_volume

    metrics: dict = {}
    # Only metadata is read here (never images), so image paths outside the star folder are harmless.
    true_table = read_star(true_star, allow_absolute_paths=True) if true_star else None
    if true_table is not None and pred_star:
        pred_table = read_star(pred_star, allow_absolute_paths=True)
        if len(pred_table) != len(true_table):
            raise ConfigError(f"{pred_star} has {len(pred_table)} particles, {true_star} has {len(true_table)}")
        metrics.update(pose_metrics(pred_table, true_table))
    if pred_labels:
        truth = np.load(true_labels) if true_labels else true_table["rlnClassNumber"].to_numpy()
        metrics["classes"] = confusion(np.load(pred_labels).ravel(), np.asarray(truth).ravel())
        metrics["confusion_rate"] = metrics["classes"]["confusion_rate"]
    if volume and true_volume:
        predicted, pixel_size = read_volume(volume)
        reference, _ = read_volume(true_volume)
        metrics["fsc"] = fsc_metrics(*common_box(predicted, reference), pixel_size)
        metrics["resolution_fsc0.5_angstrom"] = metrics["fsc"]["resolution_fsc0.5_angstrom"]
    if volumes_json and truth_json and "classes" in metrics:
        alignment = None
        if "global_rotation" in metrics and not same_frame(metrics):
            alignment = PoseAlignment(np.asarray(metrics["global_rotation"]), metrics["mirrored_hand"])
        metrics["state_fsc"] = state_fsc_metrics(volumes_json, truth_json, metrics["classes"]["matching"], alignment)
    if not metrics:
        raise ConfigError("nothing to evaluate: give --true-star with --pred-star, --pred-labels, or two volumes")
    return metrics
