"""Data-parallel training: 2 gloo processes on the CPU (torchrun) follow 1 process at twice the batch size.

The two-process run is a real `torchrun` launch (`python -m torch.distributed.run`), so the environment detection,
the process group, the sharded loader, DDP, rank-0-only writing and resuming are all exercised.

Why the loss curves agree closely but not bit for bit: each process averages the gradient over its half of the
batch and gloo averages the two halves, where one process sums the whole batch at once. The sums differ in the last
bits (1e-7 relative in the first steps), and training amplifies that (winner-takes-all pose choices, Adam on
near-zero gradients): 2e-4 relative after 12 steps here. One process that averages the gradients of the two halves
itself (gradient accumulation) computes what DDP computes, and its curve is the same to the last bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryofire.errors import ConfigError
from cryofire.io import read_particles
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.train import TrainConfig, train
from cryofire.train.checkpoint import load_checkpoint
from cryofire.train.data import ParticleImages, make_loader
from cryofire.train.distributed import Launch, launch_from_env
from cryofire.train.loop import Trainer, training_step

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = shutil.which("snakemake", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="this PyTorch build has no torch.distributed with the gloo backend",
)

SMALL_MODEL = {
    "encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32,
    "decoder_width": 32, "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2,
    # No random latents for the decoder: with them each process draws its own, so the curves would only agree
    # statistically (see bench/RESULTS.md for that comparison).
    "pose_only_fraction": 0.0,
}
# 192 images, a quarter held out: 144 training images, 4 steps of 32 (1 process) or 2 x 16 (2 processes) per epoch.
OPTIONS = {"epochs": 3, "learning_rate": 1e-3, "log_every_steps": 1, "val_fraction": 0.25, "device": "cpu",
           "model": SMALL_MODEL}
TOLERANCE = 1e-3  # relative, against one process at twice the batch; measured: 1.9e-4 (12 steps)
EXACT = 1e-6  # relative, against one process accumulating the gradients of the two halves; measured: 0

# Under torchrun: a run killed by the scheduler after its second epoch (its checkpoint written, no final outputs),
# then `cryofire train --resume` (the command line's code, in the same processes: one launch is enough).
KILLED_THEN_RESUMED = """\
import json, sys
from cryofire.cli import main
from cryofire.train import TrainConfig
from cryofire.train.loop import Trainer

particles, run, options, flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
trainer = Trainer(particles, run, TrainConfig.from_dict(options))
trainer.config.epochs = 2
trainer.fit()
assert trainer.launch.distributed and trainer.epoch == 2
del trainer
sys.exit(main(["train", particles, "-o", run, "--resume", *flags]))
"""


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(n_images=192, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return str(simulate_dataset(config, folder))


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def cli_flags(options: dict) -> list[str]:
    """`cryofire train` options of a TrainConfig dictionary."""
    flags = []
    for key, value in {**{k: v for k, v in options.items() if k != "model"}, **options["model"]}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def records(run: Path, event: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r["event"] == event]


def accumulating_step(self: Trainer, batch: dict) -> float:
    """Trainer.step of one process that averages the gradients of the two halves of its batch, as DDP does."""
    half = len(batch["index"]) // 2
    self.optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for part in (slice(0, half), slice(half, None)):
        out = training_step(self.model, {k: v[part] for k, v in batch.items()}, self.images_seen, self.device,
                            self.config)
        (out["loss"] / 2).backward()
        loss = loss + out["loss"].detach() / 2
    self.images_seen += len(batch["index"])
    self.optimizer.step()
    return float(loss)


def test_two_processes_follow_one_process_at_twice_the_batch_and_resume(particles, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the torchrun processes, so that the same kernels sum in the same order
    try:
        one = train(particles, tmp_path / "one", TrainConfig(**OPTIONS, batch_size=32))
        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "step", accumulating_step)
            halves = train(particles, tmp_path / "halves", TrainConfig(**OPTIONS, batch_size=32))
    finally:
        torch.set_num_threads(threads)

    # Two processes of batch 16, stopped after epoch 2 as if killed, then resumed through the command line.
    two = tmp_path / "two"
    script = tmp_path / "killed_then_resumed.py"
    script.write_text(KILLED_THEN_RESUMED)
    options = {**OPTIONS, "batch_size": 16}
    result = torchrun(str(script), particles, str(two), json.dumps(options), *cli_flags(options))
    assert result.stdout.count("resumed at epoch 2 (256 images seen)") == 1  # rank 0 only
    assert result.stdout.count(str(two)) == 1 and result.stdout.strip().endswith(str(two))

    # The same steps, the same images counted, the same losses up to float summation order.
    steps_one, steps_two = records(one, "step"), records(two, "step")
    assert len(steps_one) == len(steps_two) == 12
    assert [r["images_seen"] for r in steps_two] == [r["images_seen"] for r in steps_one] == list(range(32, 385, 32))
    loss_one, loss_two = np.array([r["loss"] for r in steps_one]), np.array([r["loss"] for r in steps_two])
    assert np.max(np.abs(loss_two / loss_one - 1)) < TOLERANCE, (loss_one, loss_two)
    loss_halves = np.array([r["loss"] for r in records(halves, "step")])
    assert np.max(np.abs(loss_two / loss_halves - 1)) < EXACT, (loss_halves, loss_two)
    assert loss_two[-1] < loss_two[0]
    epochs_one, epochs_two = records(one, "epoch"), records(two, "epoch")
    assert [r["epoch"] for r in epochs_two] == [1, 2, 3]  # one line per epoch: only rank 0 logs
    for a, b in zip(epochs_one, epochs_two):
        assert a["radius_px"] == b["radius_px"]
        assert abs(b["val_loss"] / a["val_loss"] - 1) < TOLERANCE
        assert abs(b["train_loss"] / a["train_loss"] - 1) < TOLERANCE

    # One set of outputs, from rank 0, matching the single-process run's.
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    latents = np.load(two / "latents.npy")
    assert np.allclose(latents, np.load(halves / "latents.npy"), atol=1e-5)
    # Against batch 32: a few images switch between their two (mirrored) hypotheses and get the other path's
    # latent; the typical image moves by ~1e-3 (latents ~0.3).
    assert np.median(np.abs(latents - np.load(one / "latents.npy"))) < 1e-2
    assert yaml.safe_load((two / "config.yaml").read_text())["launch"] == {"processes": 2, "global_batch_size": 32}
    assert len(load_checkpoint(two / "checkpoint.pt")["rank_rng"]) == 2


def test_processes_share_each_global_batch_in_order(particles):
    """Rank r's k-th batch is slice r of the single-process batch k at world_size x the batch size."""
    dataset = ParticleImages(read_particles(particles))
    single = [b["index"].tolist() for b in make_loader(dataset, 48, True, 5, 2, 0, False)]
    shards = [[b["index"].tolist() for b in make_loader(dataset, 16, True, 5, 2, 0, False, rank, 3)]
              for rank in range(3)]
    assert len(single) == 4 and all(len(s) == 4 for s in shards)
    assert [sum((s[k] for s in shards), []) for k in range(4)] == single
    with pytest.raises(ValueError, match="shuffled"):
        make_loader(dataset, 16, False, 5, 2, 0, False, 0, 2)


def test_launch_is_read_from_torchrun_variables():
    assert launch_from_env({}) == Launch(0, 0, 1) and not launch_from_env({}).distributed
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert launch == Launch(3, 1, 4) and launch.distributed and not launch.is_main
    with pytest.raises(ConfigError, match="inconsistent"):
        launch_from_env({"WORLD_SIZE": "2", "RANK": "2"})


@pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed (pip install '.[workflow]')")
def test_workflow_launches_torchrun_when_the_config_asks_for_several_gpus(tmp_path):
    (tmp_path / "config").mkdir()
    config = {"datasets": {"tiny": {"simulate": {"n_images": 10}, "train": {"gpus": 2}}}}
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    # profiles/default allows one GPU at a time: a workstation with two passes --resources gpu=2.
    result = subprocess.run([SNAKEMAKE, "results/tiny/train/weights.pt", "-n", "-p", "--directory", str(tmp_path),
                             "--snakefile", str(REPO / "Snakefile"), "--resources", "gpu=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    job = next(job for job in (result.stdout + result.stderr).split("\n\n") if "rule train:" in job)
    assert "gpu=2" in job, job
    command = next(line for line in job.splitlines() if "cryofire.cli train" in line)
    assert "torchrun --standalone --nproc_per_node 2 -m cryofire.cli train" in command and "--resume" in command
    assert "--gpus" not in command
