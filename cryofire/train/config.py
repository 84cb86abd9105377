"""TrainConfig: the options of `cryofire train` that are not model options, and the run folder's config.yaml."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cryofire.errors import ConfigError
from cryofire.model import POSE_MODES, ModelConfig

# Model options the training loop derives itself (from the data and the schedule).
DERIVED_MODEL_OPTIONS = ("box_size", "pose_mode", "planned_images")


@dataclass
class TrainConfig:
    """Options of a training run.

    Attributes:
        epochs: passes over the training images.
        batch_size: images per optimisation step and process: under torchrun with N processes each step
            averages the gradients of N x batch_size images (the schedules count those images).
        learning_rate: Adam learning rate.
        weight_decay: Adam weight decay.
        poses: abinit (poses from the encoder), fixed (poses from the input file; learn the conformations only)
            or refine (start from the input poses and let the encoder correct them).
        val_fraction: fraction of the images held out to measure over-fitting (0 to 0.5).
        seed: random seed (model initialisation, shuffling, train/validation split).
        device: auto (CUDA when present), cpu, or cuda[:N]; under torchrun auto or cuda, and each process
            uses cuda:LOCAL_RANK.
        num_workers: DataLoader worker processes reading images ahead (0 reads in the main process).
        mixed_precision: bf16 autocast on CUDA (ignored on the CPU).
        grad_clip: clip the gradient norm to this value (0 = off).
        ema_decay: keep an exponential moving average of the weights, updated after every step with this decay
            (0.99: about the last 100 steps); it is what the epochs' evaluations, the final predictions and
            weights.pt (so `cryofire infer` and the volumes) use, while training goes on with the live weights
            (0 = off: the last step's weights).
        log_every_steps: steps between lines of log.jsonl.
        search_fraction: ab initio only: fraction of the planned images during which a teacher (``teacher``)
            gives the decoder its poses and the encoder its targets (0 = pure amortized training, as in cryoFIRE;
            1 = the whole run, and poses.star then holds the teacher's poses of the training images).
        teacher: what gives the encoder its pose targets while ``search_fraction`` lasts: "em" (a classical ab
            initio run once before training: stochastic EM with two class maps, then refinement to Nyquist;
            :mod:`cryofire.model.ab_initio`) or "search" (a global search against the model's own map, repeated).
        em_iterations: minibatch iterations of the "em" teacher's stochastic EM (64 images each).
        em_starts: random starts of the "em" teacher's stochastic EM; the one whose maps explain the images best
            is kept (a start can end in a wrong optimum).
        em_classes: class maps of the "em" teacher (discrete conformations, as RELION's Class3D K); the encoder
            learns them in its first ``em_classes`` latent coordinates and poses.star gets them as rlnClassNumber.
        simulated_batch_size: "em" teacher: images simulated afresh from its class maps (the data's CTFs, shifts,
            class proportions and noise spectrum; :mod:`cryofire.model.map_images`) added to every step while it
            teaches, for the encoder alone (pose, shift and class losses at their known values). The encoder needs
            millions of images to learn poses, more than a data set holds (0 = off).
        simulated_noise_ramp: fraction of the planned images over which the simulated images' noise amplitude
            rises linearly from 0.1 to 1 times the data's (a curriculum: the encoder finds poses sooner on cleaner
            images first); 0 = the data's noise from the start.
        search_every_images: images between two pose searches (0 = twice per epoch; "search" teacher).
        search_rotations: random rotations scored per search.
        search_max_radius_px: highest frequency radius (lattice px) used by the search.
        datadir: folder the image paths are relative to (default: the particle file's folder).
        allow_absolute_paths: allow image paths outside the data folder.
        model: ModelConfig options overriding its defaults.
    """

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    poses: str = "abinit"
    val_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    mixed_precision: bool = True
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    log_every_steps: int = 50
    search_fraction: float = 0.0
    teacher: str = "em"
    em_iterations: int = 700
    em_starts: int = 4
    em_classes: int = 2
    simulated_batch_size: int = 0
    simulated_noise_ramp: float = 0.0
    search_every_images: int = 0
    search_rotations: int = 8192
    search_max_radius_px: float = 8.0
    datadir: str | None = None
    allow_absolute_paths: bool = False
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "learning_rate": self.learning_rate > 0,
            "poses": self.poses in POSE_MODES, "val_fraction": 0.0 <= self.val_fraction <= 0.5,
            "num_workers": self.num_workers >= 0, "grad_clip": self.grad_clip >= 0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "log_every_steps": self.log_every_steps >= 1, "search_fraction": 0.0 <= self.search_fraction <= 1.0,
            "teacher": self.teacher in ("em", "search"), "em_iterations": self.em_iterations >= 1,
            "em_starts": self.em_starts >= 1, "em_classes": self.em_classes >= 1,
            "simulated_batch_size": self.simulated_batch_size >= 0,
            "simulated_noise_ramp": 0.0 <= self.simulated_noise_ramp <= 1.0,
            "search_every_images": self.search_every_images >= 0, "search_rotations": self.search_rotations >= 1,
            "search_max_radius_px": self.search_max_radius_px >= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training option(s): {', '.join(bad)} (see `cryofire train --help`)")
        unknown = set(self.model) - {f.name for f in fields(ModelConfig)}
        derived = set(self.model) & set(DERIVED_MODEL_OPTIONS)
        if unknown or derived:
            raise ConfigError(f"model option(s) not allowed here: {', '.join(sorted(unknown | derived))}")
        if self.simulated_batch_size and not self.taught_by_em:
            raise ConfigError("--simulated-batch-size needs the em teacher: --poses abinit --teacher em "
                              "--search-fraction > 0 (its class maps are what the images are simulated from)")

    @property
    def taught_by_em(self) -> bool:
        """Whether the classical ab initio teacher ("em") gives the run its poses and classes for a while."""
        return self.poses == "abinit" and self.search_fraction > 0 and self.teacher == "em"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def software_versions() -> dict[str, str]:
    """Versions of Python and the packages results depend on, the platform, CUDA, and torch's CPU thread count
    (bit-for-bit reproducibility on the CPU holds for one thread count)."""
    import torch

    versions = {"python": platform.python_version(), "platform": platform.platform(),
                "cuda": str(torch.version.cuda), "torch_threads": str(torch.get_num_threads())}
    for package in ("cryofire", "torch", "numpy", "mrcfile", "starfile", "pandas"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_run_config(run_dir: Path, config: TrainConfig, model_config: ModelConfig, data: dict,
                     processes: int = 1, resumed_at_images: int | None = None) -> None:
    """config.yaml of a run: the data, the options, the derived model configuration, the number of training
    processes (torchrun) and the resulting global batch size, versions, command line. A resumed run keeps the first
    command and adds its own to ``resumed`` (command, images seen when resumed, time)."""
    command, resumed = sys.argv, []
    previous_path = run_dir / "config.yaml"
    if resumed_at_images is not None and previous_path.exists():
        previous = yaml.safe_load(previous_path.read_text()) or {}
        command = previous.get("command", command)
        resumed = previous.get("resumed", []) + [
            {"command": sys.argv, "images_seen": resumed_at_images, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    payload = {
        "data": data,
        "train": config.to_dict(),
        "model": model_config.to_dict(),
        "launch": {"processes": processes, "global_batch_size": config.batch_size * processes},
        "command": command,
        "versions": software_versions(),
    }
    if resumed:
        payload["resumed"] = resumed
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(payload, sort_keys=False))
    os.replace(tmp, run_dir / "config.yaml")
