"""Running a model over a whole dataset without gradients: poses, shifts, latents and per-image losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryofire.evaluate import align_poses, fit_map_offset, rotation_errors_deg
from cryofire.model import CryoFireModel
from cryofire.train.data import ParticleImages, make_loader
from cryofire.train.outputs import save_npy, write_poses_star

_KEYS = ("index", "rotations", "shifts_px", "z", "per_image_loss")


@torch.no_grad()
def predict_dataset(
    model: CryoFireModel, dataset: ParticleImages, images_seen: int, device: torch.device, config
) -> dict[str, np.ndarray]:
    """Winning pose (N, 3, 3), shift (N, 2) px, latent (N, zdim) and loss (N,) of every image, in dataset order.

    `config` is the run's TrainConfig (batch size, workers, precision).
    """
    from cryofire.train.loop import training_step

    was_training = model.training
    model.eval()
    loader = make_loader(dataset, 4 * config.batch_size, False, config.seed, 0, config.num_workers,
                         device.type == "cuda")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in _KEYS}
    for batch in loader:
        out = training_step(model, batch, images_seen, device, config)
        out["index"] = batch["index"]
        for key in _KEYS:
            parts[key].append(out[key].float().cpu().numpy() if key != "index" else out[key].numpy())
    model.train(was_training)
    return {key: np.concatenate(values) for key, values in parts.items()}


def rotation_error_summary(
    predictions: dict[str, np.ndarray], true_poses: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Median rotation error (deg, after global alignment and hand choice) and median shift error (px; as given, and
    after removing the map's global offset: :func:`cryofire.evaluate.fit_map_offset`).

    `true_poses` are the (N, 3, 3) matrices and (N, 2) origins in pixels of the whole table.
    """
    rows = predictions["index"]
    pred = predictions["rotations"].astype(np.float64)
    truth = true_poses[0].numpy().astype(np.float64)[rows]
    errors = rotation_errors_deg(align_poses(pred, truth).apply(pred), truth)
    differences = predictions["shifts_px"] - true_poses[1].numpy()[rows]
    return {"rotation_error_median_deg": float(np.median(errors)),
            "shift_error_median_px": float(np.median(np.linalg.norm(differences, axis=1))),
            "shift_error_aligned_median_px": float(np.median(fit_map_offset(pred, differences)[1]))}


def encoder_classes(config, z: np.ndarray) -> np.ndarray | None:
    """The classes (N,) 0-based the encoder of a run taught by the "em" teacher predicts: the largest of the first
    ``em_classes`` latent coordinates of z (N, zdim), which learned the teacher's classes; None for other runs.
    `config` is the run's TrainConfig."""
    if not config.taught_by_em or z.shape[1] < config.em_classes:
        return None
    return z[:, : config.em_classes].argmax(1)


def save_predictions(run_dir: Path, table: pd.DataFrame, predictions: dict[str, np.ndarray]) -> None:
    """poses.star (RELION 3.1, input order; rlnClassNumber from ``predictions["classes"]`` when there) and
    latents.npy (N, zdim) float32."""
    order = np.argsort(predictions["index"])
    classes = predictions.get("classes")
    write_poses_star(run_dir / "poses.star", table, predictions["rotations"][order], predictions["shifts_px"][order],
                     None if classes is None else classes[order])
    save_npy(run_dir / "latents.npy", predictions["z"][order].astype(np.float32))
