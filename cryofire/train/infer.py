"""`cryofire infer`: poses and latents of images a trained model never saw, without any training.

This is what amortization buys: the cost is one encoder pass per image (plus, when the model keeps several pose
hypotheses per image, one decoder pass to pick the best), independent of the number of poses a search would try.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from cryofire.device import resolve_device
from cryofire.errors import CryofireError
from cryofire.io import read_particles
from cryofire.model import CryoFireModel, ModelConfig
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.config import TrainConfig
from cryofire.train.data import ParticleImages, has_poses
from cryofire.train.predict import encoder_classes, predict_dataset, save_predictions


def load_trained_model(run_dir: str | Path, device: torch.device) -> tuple[CryoFireModel, TrainConfig, int]:
    """The model of a finished run (weights.pt), its training options and the images it saw."""
    state = load_checkpoint(Path(run_dir) / "weights.pt", map_location=device)
    model = CryoFireModel(ModelConfig.from_dict(state["model_config"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), TrainConfig.from_dict(state["train_config"]), int(state["images_seen"])


def infer(
    run_dir: str | Path,
    particles: str | Path,
    out_dir: str | Path,
    datadir: str | Path | None = None,
    allow_absolute_paths: bool = False,
    batch_size: int = 256,
    device: str = "auto",
) -> Path:
    """Write `out_dir/poses.star` and `out_dir/latents.npy` for the images of `particles`; returns `out_dir`."""
    torch_device = resolve_device(device)
    model, train_config, images_seen = load_trained_model(run_dir, torch_device)
    table = read_particles(particles, datadir=datadir, allow_absolute_paths=allow_absolute_paths)
    dataset = ParticleImages(table)
    if dataset.image_size != model.config.box_size:
        raise CryofireError(f"{particles}: images are {dataset.image_size} px, the model was trained on "
                            f"{model.config.box_size} px (preprocess them with --box {model.config.box_size})")
    if model.config.pose_mode != "abinit" and not has_poses(table):
        raise CryofireError(f"{particles}: the model was trained with --poses {model.config.pose_mode}, "
                            "so the images need poses")
    options = replace(train_config, batch_size=max(1, batch_size // 4), device=device, num_workers=0)
    predictions = predict_dataset(model, dataset, images_seen, torch_device, options)
    classes = encoder_classes(train_config, predictions["z"])
    if classes is not None:
        predictions["classes"] = classes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_predictions(out_dir, table, predictions)
    return out_dir
