"""A training run killed (SIGKILL) at a random moment and resumed with --resume ends bit-identical to an uninterrupted
run, and a killed run never leaves a partial file under a final name.

`cryofire train` runs as a subprocess (one thread, CPU) on a tiny simulated dataset. The kill lands a random delay
after the first checkpoint appears, drawn up to a little more than an uninterrupted run takes from there to its
weights.pt, so it falls in any epoch, during a checkpoint write or while the final outputs are written. The delay
comes from CRYOFIRE_KILL_SEED when set (to replay a failure), else from a fresh seed; both are in the failure message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryofire.io import read_star
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.train.checkpoint import load_checkpoint

# The small model of tests/test_train.py, as command-line options.
SMALL_MODEL = {"encoder-channels": 8, "encoder-max-channels": 32, "encoder-hidden-dim": 32, "decoder-width": 32,
               "decoder-depth": 1, "num-fourier-features": 16, "zdim": 2}
TRAIN_OPTIONS = ["--epochs", "15", "--batch-size", "16", "--device", "cpu", "--num-workers", "0",
                 "--log-every-steps", "1", *(f"--{key}={value}" for key, value in SMALL_MODEL.items())]
POLL_SECONDS = 0.01
RUN_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    """64 images of 16 x 16 px: 4 steps an epoch."""
    config = SimulationConfig(n_images=64, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return simulate_dataset(config, tmp_path_factory.mktemp("sim"))


def _start(particles: Path, run: Path, *extra: str) -> subprocess.Popen:
    """`cryofire train` in a new process with one thread (the same arithmetic in every run).

    Its output goes to ``<run>.log`` (a pipe could fill up and stall it while the test waits).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cryofire.cli", "train", str(particles), "-o", str(run), *TRAIN_OPTIONS, *extra]
    with open(run.with_suffix(".log"), "a") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _output(run: Path) -> str:
    return run.with_suffix(".log").read_text()[-3000:]


def _wait_for(process: subprocess.Popen, path: Path) -> float:
    """Poll until ``path`` exists; the time.monotonic() when it was seen."""
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not path.exists():
        assert process.poll() is None, f"training ended before writing {path.name}: {_output(path.parent)}"
        assert time.monotonic() < deadline, f"no {path.name} within the time limit"
        time.sleep(POLL_SECONDS)
    return time.monotonic()


def _finish(process: subprocess.Popen, run: Path) -> None:
    assert process.wait(timeout=RUN_TIMEOUT_SECONDS) == 0, _output(run)


@pytest.fixture(scope="module")
def uninterrupted(particles, tmp_path_factory) -> tuple[Path, float]:
    """A complete run, and the seconds from its first checkpoint to its weights.pt."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    process = _start(particles, run)
    first_checkpoint = _wait_for(process, run / "checkpoint.pt")
    seconds = _wait_for(process, run / "weights.pt") - first_checkpoint
    _finish(process, run)
    return run, seconds


def _assert_no_partial_file(run: Path) -> None:
    """Every file under a final name in ``run`` is complete (reads back)."""
    readers = {"checkpoint.pt": load_checkpoint, "weights.pt": load_checkpoint, "latents.npy": np.load,
               "poses.star": lambda path: read_star(path, allow_absolute_paths=True),
               "config.yaml": lambda path: yaml.safe_load(path.read_text())["versions"],
               "log.jsonl": lambda path: [json.loads(line) for line in path.read_text().splitlines()]}
    for name, read in readers.items():
        if (run / name).exists():
            read(run / name)


def _resume_until_done(particles: Path, run: Path, max_attempts: int = 3) -> int:
    """Run `--resume` until weights.pt exists; the number of attempts."""
    for attempt in range(1, max_attempts + 1):
        _finish(_start(particles, run, "--resume"), run)
        if (run / "weights.pt").exists():
            return attempt
    raise AssertionError(f"no weights.pt after {max_attempts} resumed runs")


@pytest.mark.slow  # three training processes, each importing torch: ~15 s on two shared cores
def test_killed_run_resumes_to_the_same_weights(particles, uninterrupted, tmp_path):
    reference, seconds_after_checkpoint = uninterrupted
    seed = int(os.environ.get("CRYOFIRE_KILL_SEED", random.randrange(2**32)))
    delay = random.Random(seed).uniform(0.0, 1.1 * seconds_after_checkpoint)  # a few kills after the end
    replay = f"CRYOFIRE_KILL_SEED={seed}: killed {delay:.3f} s after the first checkpoint"
    run = tmp_path / "run"
    process = _start(particles, run)
    _wait_for(process, run / "checkpoint.pt")
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=RUN_TIMEOUT_SECONDS)
    _assert_no_partial_file(run)
    replay += f" (checkpoint at epoch {load_checkpoint(run / 'checkpoint.pt')['epoch']}"
    replay += f", weights.pt {'present' if (run / 'weights.pt').exists() else 'absent'})"
    print(replay)

    _resume_until_done(particles, run)
    expected = load_checkpoint(reference / "weights.pt")["model"]
    resumed = load_checkpoint(run / "weights.pt")["model"]
    assert expected.keys() == resumed.keys(), replay
    different = [name for name in expected if not torch.equal(expected[name], resumed[name])]
    assert not different, f"{replay}: tensors differ from the uninterrupted run: {different}"
    assert np.array_equal(np.load(reference / "latents.npy"), np.load(run / "latents.npy")), replay
