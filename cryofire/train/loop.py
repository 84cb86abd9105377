"""The training loop of `cryofire train`: read it top to bottom.

setup (run folder, seed, device) -> data (particle table, train/validation split, loaders) -> model and optimizer
-> resume from the last checkpoint if asked -> epochs of steps (progress bar, JSON-lines log, atomic checkpoint every
epoch) -> final outputs (poses.star, latents.npy, weights.pt; from a moving average of the weights with `ema_decay`).

Schedules are counted in images seen. Shuffling depends only on (seed, epoch) and the random-number state is saved
in each checkpoint, so a run killed at any moment and resumed with `--resume` ends with the same weights as an
uninterrupted one (bit for bit on the CPU).

Under torchrun (several processes, :mod:`cryofire.train.distributed`) every process takes its share of each step's
images and DistributedDataParallel averages the gradients: N processes with `batch_size` B follow one process with
batch N x B (up to the order of float sums). Rank 0 alone evaluates, logs, writes checkpoints and the final
outputs; all ranks resume from the same checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cryofire.errors import ConfigError, CryofireError
from cryofire.io import read_particles
from cryofire.model import CryoFireModel, ModelConfig
from cryofire.model.em_init import EMConfig
from cryofire.train.checkpoint import load_checkpoint, save_checkpoint
from cryofire.train.config import TrainConfig, write_run_config
from cryofire.train.data import ParticleImages, ctf_from_parameters, has_poses, make_loader
from cryofire.train.distributed import (
    Launch,
    broadcast_object,
    gather_objects,
    launch_from_env,
    mean_over_processes,
    process_seed,
    setup,
    shutdown,
    wait_for_all,
)
from cryofire.train.predict import encoder_classes, predict_dataset, rotation_error_summary, save_predictions
from cryofire.train.teacher import EMTeacher, PoseTeacher, target_rotation_error

CHECKPOINT_NAME = "checkpoint.pt"
MAX_BAD_STEPS = 20  # consecutive non-finite losses before training stops


def split_rows(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, validation) row indices, sorted; the validation set is `val_fraction` of the rows."""
    n_val = int(round(n_rows * val_fraction))
    order = np.random.default_rng(seed).permutation(n_rows)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def training_step(
    model: CryoFireModel | torch.nn.parallel.DistributedDataParallel, batch: dict, images_seen: int,
    device: torch.device, config: TrainConfig, targets: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward pass of one batch (under bf16 autocast on CUDA when asked); `targets` are pose-search targets.

    `model` may be wrapped in DistributedDataParallel (multi-process training)."""
    images = batch["images"].to(device, non_blocking=True)
    ctf = ctf_from_parameters(batch["ctf_parameters"].to(device), images.shape[-1])
    given = {}
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if core.config.pose_mode != "abinit":
        given = {"given_rotations": batch["rotations"].to(device), "given_shifts_px": batch["origins_px"].to(device)}
    use_bf16 = config.mixed_precision and device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return model(images, ctf, images_seen, **given, **(targets or {}))


class Trainer:
    """State of one run: model, optimizer, counters; `fit` runs the epochs.

    `launch` is this process's place in a torchrun launch (default: read from the environment); a multi-process
    launch joins the process group here. `self.model` is always the plain model (evaluation, pose search,
    checkpoints); `self.forward_model` is what the training steps call (the DistributedDataParallel wrapper when
    there are several processes).
    """

    def __init__(self, particles: str | Path, run_dir: str | Path, config: TrainConfig,
                 launch: Launch | None = None) -> None:
        self.run_dir, self.config = Path(run_dir), config
        self.launch = launch_from_env() if launch is None else launch
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.device = setup(config.device, self.launch)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.table = read_particles(particles, datadir=config.datadir, allow_absolute_paths=config.allow_absolute_paths)
        if config.poses != "abinit" and not has_poses(self.table):
            raise CryofireError(f"{particles}: --poses {config.poses} needs poses (rlnAngleRot/Tilt/Psi, origins)")
        train_rows, self.val_rows = split_rows(len(self.table), config.val_fraction, config.seed)
        self.train_set = ParticleImages(self.table, train_rows)
        self.val_set = ParticleImages(self.table, self.val_rows) if len(self.val_rows) else None
        global_batch = config.batch_size * self.launch.world_size
        planned = config.epochs * (len(train_rows) // global_batch) * global_batch
        model_config = ModelConfig.from_dict(
            {**config.model, "box_size": self.train_set.image_size, "pose_mode": config.poses,
             "planned_images": max(planned, 1)}
        )
        if config.taught_by_em and 0 < model_config.zdim < config.em_classes:
            raise ConfigError(f"em_classes {config.em_classes} needs zdim >= {config.em_classes}: the encoder learns "
                              "the teacher's classes in its first em_classes latent coordinates")
        self.model = CryoFireModel(model_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
        self.averaged = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
                         if config.ema_decay else None)
        self.forward_model = self.model
        if self.launch.distributed:
            self.forward_model = self.wrap_data_parallel()
        self.epoch, self.images_seen, self.bad_steps = 0, 0, 0
        self.teacher = None
        if config.taught_by_em:
            self.teacher = EMTeacher(len(self.table), model_config.planned_images, config.search_fraction,
                                     EMConfig(iterations=config.em_iterations, classes=config.em_classes,
                                              starts=config.em_starts, seed=config.seed))
        elif config.poses == "abinit" and config.search_fraction > 0:
            self.teacher = PoseTeacher(len(self.table), model_config.planned_images, config.search_fraction,
                                       config.search_every_images or max(len(train_rows) // 2, 1),
                                       config.search_rotations, config.search_max_radius_px, config.seed)
        self.log_path = self.run_dir / "log.jsonl"
        self.data_info = {
            "particles": str(Path(particles).resolve()), "n_images": len(self.table),
            "n_train": len(train_rows), "n_val": len(self.val_rows), "box_size": self.train_set.image_size,
            "pixel_size_angstrom": float(self.table["rlnImagePixelSize"].iloc[0]),
        }

    def wrap_data_parallel(self) -> torch.nn.parallel.DistributedDataParallel:
        """DistributedDataParallel around the model (it copies rank 0's weights to every process); from here on
        each process draws its own random numbers (pose-only latents, variational samples)."""
        import inspect

        ddp = torch.nn.parallel.DistributedDataParallel
        # The buffers (lattice, window, Fourier features) are constants: no need to send them at every step.
        # (`forward_sync_buffers` replaces `broadcast_buffers` in recent PyTorch.)
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                          else {"broadcast_buffers": False})
        # Some parameters get no gradient in some phases (the latent head while the decoder gets random latents,
        # the pose heads with `--poses fixed`), so DDP must look for them at every step (and warns once, from C++,
        # in phases where it finds none). Their gradients stay None, as in a single process: Adam skips them.
        wrapped = ddp(self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                      find_unused_parameters=True, **no_buffer_sync)
        if not self.launch.is_main:
            torch.manual_seed(process_seed(self.config.seed, self.launch.rank))
        return wrapped

    @property
    def shipped_model(self) -> CryoFireModel:
        """The weights the run's results come from: the moving average with ``ema_decay``, else the live ones."""
        return self.model if self.averaged is None else self.averaged.module

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint's contents; with several processes it also holds each one's random-number state (all
        processes must call this: it gathers them)."""
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "model_config": self.model.config.to_dict(), "train_config": self.config.to_dict(),
            "epoch": self.epoch, "images_seen": self.images_seen, "rng": torch.get_rng_state(),
            "teacher": self.teacher.state() if self.teacher else {},
            "averaged": self.averaged.state_dict() if self.averaged else {},
        }
        if self.launch.distributed:
            state["rank_rng"] = gather_objects(state["rng"], self.launch)
        return state

    def resume(self) -> bool:
        """Load `checkpoint.pt` if present; True when a run was resumed."""
        path = self.run_dir / CHECKPOINT_NAME
        if not path.exists():
            return False
        state = load_checkpoint(path, map_location=self.device)
        self.check_same_run(state, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.averaged is not None:
            self.averaged.load_state_dict(state["averaged"])
        self.epoch, self.images_seen = state["epoch"], state["images_seen"]
        torch.set_rng_state(state["rng"].cpu())
        if self.launch.distributed:
            # Each process continues its own random stream when the number of processes is unchanged.
            saved = state.get("rank_rng")
            if saved is not None and len(saved) == self.launch.world_size:
                torch.set_rng_state(saved[self.launch.rank].cpu())
            elif not self.launch.is_main:
                torch.manual_seed(process_seed(self.config.seed, self.launch.rank) + self.epoch)
        if self.teacher:
            self.teacher.load_state(state["teacher"])
        return True

    def check_same_run(self, state: dict, path: Path) -> None:
        """Refuse to resume a checkpoint made with other options (all but epochs, device, workers, logging); an
        option newer than the checkpoint counts as its default."""
        free = {"epochs", "device", "num_workers", "log_every_steps"}
        saved = {k: v for k, v in {**TrainConfig().to_dict(), **state["train_config"]}.items() if k not in free}
        wanted = {k: v for k, v in self.config.to_dict().items() if k not in free}
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        saved_model = {k: v for k, v in state["model_config"].items() if k != "planned_images"}
        wanted_model = {k: v for k, v in self.model.config.to_dict().items() if k != "planned_images"}
        changed += sorted(f"model.{k}" for k in wanted_model if saved_model.get(k) != wanted_model[k])
        if changed:
            raise CryofireError(f"{path}: cannot resume, the run was started with other options "
                                f"({', '.join(changed)}); use another -o, or delete the run folder to start afresh")

    # --- the loop ---------------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """The epochs; after each, rank 0 evaluates, logs and writes the checkpoint while the others wait."""
        while self.epoch < self.config.epochs:
            started = time.time()
            train_loss = self.run_epoch()
            self.epoch += 1
            record = {"event": "epoch", "epoch": self.epoch, "images_seen": self.images_seen,
                      "train_loss": train_loss, "epoch_seconds": time.time() - started}
            if self.launch.is_main:
                record.update(self.evaluate())
            state = self.state()  # gathers the random-number states of all processes
            if self.launch.is_main:
                self.log(record)
                save_checkpoint(self.run_dir / CHECKPOINT_NAME, state)

    def run_epoch(self) -> float:
        """One pass over the training images; the mean step loss (over all processes' images)."""
        cfg = self.config
        self.forward_model.train()
        loader = make_loader(self.train_set, cfg.batch_size, True, cfg.seed, self.epoch, cfg.num_workers,
                             self.device.type == "cuda", self.launch.rank, self.launch.world_size)
        losses, started, images_at_start = [], time.time(), self.images_seen
        progress = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch", mininterval=2.0,
                        disable=not self.launch.is_main)
        for step, batch in enumerate(progress):
            loss = self.step(batch)
            if loss is not None:
                losses.append(loss)
            rate = (self.images_seen - images_at_start) / max(time.time() - started, 1e-9)
            progress.set_postfix(loss=f"{losses[-1] if losses else math.nan:.4g}", img_s=f"{rate:.0f}")
            if (step + 1) % cfg.log_every_steps == 0:
                simulated = {"simulated_noise_scale": self.simulated_noise_scale()} if cfg.simulated_batch_size else {}
                self.log({"event": "step", "epoch": self.epoch, "images_seen": self.images_seen,
                          "loss": float(np.mean(losses[-cfg.log_every_steps:])), "images_per_s": rate,
                          "learning_rate": cfg.learning_rate, "radius_px": self.radius_px(), **simulated})
        return float(np.mean(losses)) if losses else math.nan

    def step(self, batch: dict) -> float | None:
        """One optimisation step; a non-finite loss skips the update (and is logged).

        With several processes the loss returned (and checked) is the mean over all of them, so every process
        takes the same decision; `images_seen` counts the images of all processes.
        """
        targets = self.search_targets(batch)
        out = training_step(self.forward_model, batch, self.images_seen, self.device, self.config, targets)
        self.images_seen += len(batch["index"]) * self.launch.world_size
        loss = out["loss"]
        reported = mean_over_processes(loss.detach(), self.launch)
        if not torch.isfinite(reported):
            self.bad_steps += 1
            self.log({"event": "nonfinite_loss", "epoch": self.epoch, "images_seen": self.images_seen})
            if self.bad_steps >= MAX_BAD_STEPS:
                raise CryofireError(f"training stopped: the loss was NaN/inf in {MAX_BAD_STEPS} consecutive steps "
                                    "(lower --lr, set --grad-clip, or check the input images)")
            return None
        self.bad_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        return float(reported)

    def search_targets(self, batch: dict) -> dict[str, torch.Tensor] | None:
        """Pose-search targets of the batch while the teacher is active (searching first when one is due)."""
        if self.teacher is None or not self.teacher.active(self.images_seen):
            return None
        if self.teacher.due(self.images_seen):
            record = self.teacher.search(self.model, self.train_set, self.images_seen, self.device,
                                         4 * self.config.batch_size, self.config.num_workers)
            if self.launch.distributed:  # every process searched with the same weights; keep rank 0's result
                self.teacher.load_state(broadcast_object(self.teacher.state(), self.launch))
            if has_poses(self.table):
                rows = self.train_set.rows[:: max(1, len(self.train_set) // 2000)]
                record["target_rotation_error_median_deg"] = target_rotation_error(
                    self.teacher, self.train_set.poses[0], rows)
            self.log({"event": "search", "epoch": self.epoch, "images_seen": self.images_seen, **record})
        targets = self.teacher.targets(batch["index"], self.device)
        if self.config.simulated_batch_size:  # the em teacher's (TrainConfig checks)
            # drawn from a generator seeded by the step, so a resumed run draws the same images
            generator = torch.Generator().manual_seed(
                (self.config.seed * 1_000_003 + self.images_seen) * 101 + self.launch.rank)
            targets["simulated"] = self.teacher.simulated(
                self.config.simulated_batch_size, generator, self.model, self.train_set, self.device,
                4 * self.config.batch_size, self.config.num_workers, self.simulated_noise_scale())
        return targets

    def simulated_noise_scale(self) -> float:
        """Noise amplitude of the simulated images relative to the data's: 0.1 rising linearly to 1 over the first
        ``simulated_noise_ramp`` of the planned images, then 1."""
        ramp_images = self.config.simulated_noise_ramp * self.model.config.planned_images
        return min(1.0, 0.1 + 0.9 * self.images_seen / ramp_images) if ramp_images else 1.0

    def radius_px(self) -> float:
        from cryofire.model import frequency_radius_px

        return frequency_radius_px(self.images_seen, self.model.config.box_size, self.model.schedule)

    def evaluate(self) -> dict:
        """Validation loss, mask radius, and (simulated data, ab initio) rotation error of a training subset."""
        result = {"radius_px": self.radius_px()}
        if self.val_set is not None:
            val = predict_dataset(self.shipped_model, self.val_set, self.images_seen, self.device, self.config)
            result["val_loss"] = float(val["per_image_loss"].mean())
        if self.config.poses == "abinit" and has_poses(self.table):
            rows = self.train_set.rows[:: max(1, len(self.train_set) // 1000)]
            monitor = predict_dataset(self.shipped_model, ParticleImages(self.table, rows), self.images_seen,
                                      self.device, self.config)
            result.update(rotation_error_summary(monitor, self.train_set.poses))
        return result

    def log(self, record: dict) -> None:
        """Append to log.jsonl (rank 0 only) and print epoch and search lines."""
        if not self.launch.is_main:
            return
        record["wall_time"] = time.time()
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if record["event"] in ("epoch", "search"):
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                                if k not in ("event", "wall_time")))

    def finish(self) -> None:
        """Predict every image (input order) and write poses.star, latents.npy, weights.pt (rank 0 only). With a
        teacher for the whole run (``search_fraction`` 1) the training images' poses (and the "em" teacher's classes,
        rlnClassNumber) are the teacher's; the encoder gives the classes of the other images."""
        if not self.launch.is_main:
            return
        everything = ParticleImages(self.table)
        predictions = predict_dataset(self.shipped_model, everything, self.images_seen, self.device, self.config)
        classes = encoder_classes(self.config, predictions["z"])
        if self.teacher is not None and self.config.search_fraction >= 1.0:
            # The decoder was fitted at the teacher's poses all along: those are the training images' poses.
            rows = predictions["index"]
            taught = np.isin(rows, self.train_set.rows)
            predictions["rotations"][taught] = self.teacher.rotations[rows[taught]].numpy()
            predictions["shifts_px"][taught] = self.teacher.shifts_px[rows[taught]].numpy()
            if classes is not None:
                classes[taught] = self.teacher.classes[rows[taught]].numpy()
        if classes is not None:
            predictions["classes"] = classes
        save_predictions(self.run_dir, self.table, predictions)
        weights = {"model": self.shipped_model.state_dict(), "model_config": self.model.config.to_dict(),
                   "train_config": self.config.to_dict(), "images_seen": self.images_seen, "data": self.data_info}
        save_checkpoint(self.run_dir / "weights.pt", weights)


def train(particles: str | Path, run_dir: str | Path, config: TrainConfig, resume: bool = False) -> Path:
    """Train a model on a preprocessed dataset; returns the run folder.

    Run under torchrun (WORLD_SIZE > 1 in the environment) it is one process of a data-parallel run.
    """
    launch = launch_from_env()
    try:
        trainer = Trainer(particles, run_dir, config, launch)
        resumed = resume and trainer.resume()
        if resumed:
            if launch.is_main:
                tqdm.write(f"resumed at epoch {trainer.epoch} ({trainer.images_seen} images seen)")
        elif not resume and (trainer.run_dir / CHECKPOINT_NAME).exists():
            raise CryofireError(f"{trainer.run_dir} holds a checkpoint: use --resume to continue it, or another -o")
        if launch.is_main:
            write_run_config(trainer.run_dir, config, trainer.model.config, trainer.data_info, launch.world_size,
                             trainer.images_seen if resumed else None)
        trainer.fit()
        trainer.finish()
        wait_for_all(launch)  # the other processes end when rank 0 has written the outputs
    finally:
        shutdown(launch)
    return trainer.run_dir

