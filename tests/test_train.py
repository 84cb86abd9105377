"""The training loop: it runs and learns, resumes exactly, writes readable outputs, and infer reproduces it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from cryofire.io import read_star
from cryofire.simulate import SimulationConfig, simulate_dataset
from cryofire.train import TrainConfig, train
from cryofire.errors import CryofireError
from cryofire.train.checkpoint import load_checkpoint, save_checkpoint
from cryofire.train.config import write_run_config
from cryofire.train.data import ParticleImages, make_loader
from cryofire.train.infer import infer
from cryofire.train.loop import Trainer

SMALL_MODEL = {
    "encoder_channels": 8, "encoder_max_channels": 32, "encoder_hidden_dim": 32,
    "decoder_width": 32, "decoder_depth": 1, "num_fourier_features": 16, "zdim": 2,
}


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> str:
    """192 clean-ish D=16 images of the hinged phantom with true poses."""
    folder = tmp_path_factory.mktemp("sim")
    config = SimulationConfig(n_images=192, box_size=16, pixel_size_angstrom=10.0, snr=10.0, seed=3)
    return str(simulate_dataset(config, folder))


def small_config(**changes) -> TrainConfig:
    values = {"epochs": 2, "batch_size": 16, "learning_rate": 1e-3, "log_every_steps": 4, "model": SMALL_MODEL}
    return TrainConfig(**{**values, **changes})


def test_training_runs_loss_falls_and_writes_outputs(particles, tmp_path):
    run = train(particles, tmp_path / "run", small_config(epochs=4, val_fraction=0.25))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(epochs) == 4 and all("val_loss" in r and "rotation_error_median_deg" in r for r in epochs)
    steps = [r for r in records if r["event"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    poses = read_star(run / "poses.star", allow_absolute_paths=True)
    assert len(poses) == 192 and np.isfinite(poses["rlnAngleTilt"]).all()
    assert np.load(run / "latents.npy").shape == (192, 2)
    weights = torch.load(run / "weights.pt", weights_only=True)
    assert weights["model_config"]["box_size"] == 16


def test_resume_after_interruption_gives_the_same_weights(particles, tmp_path):
    """The decoder gets random latents all run (pose-only phase), so the resumed run must continue the checkpointed
    random stream, not only the weights."""
    config = small_config(epochs=3, model={**SMALL_MODEL, "pose_only_fraction": 1.0})
    uninterrupted = train(particles, tmp_path / "full", config)
    partial = Trainer(particles, tmp_path / "resumed", replace(config))
    partial.config.epochs = 1  # stop after the first epoch's checkpoint, as a kill would
    partial.fit()
    resumed = train(particles, tmp_path / "resumed", config, resume=True)
    a = load_checkpoint(uninterrupted / "weights.pt")["model"]
    b = load_checkpoint(resumed / "weights.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_making_a_loader_leaves_the_global_random_stream_alone(particles):
    """A loader draws its workers' base seed from a generator of its own: the teacher rebuilds its maps through a
    loader at the first step after a resume, which must not move the stream the pose-only latents are drawn from."""
    dataset = ParticleImages(read_star(particles, allow_absolute_paths=True))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for shuffle in (True, False):
        next(iter(make_loader(dataset, 16, shuffle, 5, 2, 0, False)))
    assert torch.equal(torch.rand(3), expected)


def test_the_moving_average_of_the_weights_follows_its_recursion(particles, tmp_path):
    """After each step the average becomes d * average + (1 - d) * weights (the first step's weights copied)."""
    trainer = Trainer(particles, tmp_path / "run", small_config(ema_decay=0.75))
    live = []
    for start in (0, 16, 32):
        trainer.step(trainer.train_set.__getitems__(list(range(start, start + 16))))
        live.append({k: v.detach().clone() for k, v in trainer.model.named_parameters()})
    averaged = dict(trainer.shipped_model.named_parameters())
    for name, value in averaged.items():
        expected = 0.75 * (0.75 * live[0][name] + 0.25 * live[1][name]) + 0.25 * live[2][name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not torch.equal(averaged["encoder.rotation_head.weight"], live[2]["encoder.rotation_head.weight"])


def test_the_moving_average_is_shipped_leaves_training_alone_and_resumes_exactly(particles, tmp_path):
    """weights.pt (and so latents.npy and `cryofire infer`) holds the average; the live weights train exactly as
    without it; a run killed after its first epoch resumes to the same average."""
    config = small_config(epochs=3, ema_decay=0.9)
    uninterrupted = train(particles, tmp_path / "full", config)
    plain = train(particles, tmp_path / "plain", replace(config, ema_decay=0.0))
    live, shipped = load_checkpoint(uninterrupted / "checkpoint.pt"), load_checkpoint(uninterrupted / "weights.pt")
    assert all(torch.equal(v, load_checkpoint(plain / "checkpoint.pt")["model"][k]) for k, v in live["model"].items())
    assert all(torch.equal(v, live["averaged"][f"module.{k}"]) for k, v in shipped["model"].items())
    assert not torch.equal(shipped["model"]["encoder.rotation_head.weight"],
                           live["model"]["encoder.rotation_head.weight"])
    inferred = infer(uninterrupted, particles, tmp_path / "infer", device="cpu")
    assert np.allclose(np.load(inferred / "latents.npy"), np.load(uninterrupted / "latents.npy"), atol=1e-5)
    partial = Trainer(particles, tmp_path / "resumed", replace(config))
    partial.config.epochs = 1
    partial.fit()
    resumed = train(particles, tmp_path / "resumed", config, resume=True)
    b = load_checkpoint(resumed / "weights.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in shipped["model"].items())


def test_a_checkpoint_older_than_an_option_resumes_when_the_option_is_at_its_default(particles, tmp_path):
    config = small_config(epochs=2)
    partial = Trainer(particles, tmp_path / "run", replace(config, epochs=1))
    partial.fit()
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    del state["train_config"]["grad_clip"]  # as written before the option existed
    save_checkpoint(path, state)
    with pytest.raises(CryofireError, match=r"other options \(grad_clip\)"):
        train(particles, tmp_path / "run", replace(config, grad_clip=1.0), resume=True)
    run = train(particles, tmp_path / "run", config, resume=True)
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2


def test_resumed_run_keeps_its_first_command_and_records_the_resume(particles, tmp_path, monkeypatch):
    config = small_config(epochs=2)
    monkeypatch.setattr("sys.argv", ["cryofire", "train", "first"])
    partial = Trainer(particles, tmp_path / "run", replace(config, epochs=1))
    write_run_config(partial.run_dir, partial.config, partial.model.config, partial.data_info)
    partial.fit()
    monkeypatch.setattr("sys.argv", ["cryofire", "train", "again", "--resume"])
    train(particles, tmp_path / "run", config, resume=True)
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["command"] == ["cryofire", "train", "first"]
    assert [r["command"][-1] for r in recorded["resumed"]] == ["--resume"]
    assert recorded["resumed"][0]["images_seen"] > 0
    assert {"seed", "epochs"} <= recorded["train"].keys()
    assert {"torch", "cuda", "torch_threads"} <= recorded["versions"].keys()


def test_same_seed_reproduces_bit_for_bit(particles, tmp_path):
    first = train(particles, tmp_path / "a", small_config(epochs=1))
    second = train(particles, tmp_path / "b", small_config(epochs=1))
    assert np.array_equal(np.load(first / "latents.npy"), np.load(second / "latents.npy"))


def test_infer_reproduces_the_training_encodings(particles, tmp_path):
    run = train(particles, tmp_path / "run", small_config(epochs=1))
    out = infer(run, particles, tmp_path / "infer", device="cpu")
    assert np.allclose(np.load(out / "latents.npy"), np.load(run / "latents.npy"), atol=1e-5)
    trained = read_star(run / "poses.star", allow_absolute_paths=True)
    inferred = read_star(out / "poses.star", allow_absolute_paths=True)
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
        assert np.allclose(trained[column], inferred[column], atol=1e-3)


def test_fixed_poses_are_written_back_unchanged(particles, tmp_path):
    run = train(particles, tmp_path / "run", small_config(epochs=1, poses="fixed"))
    truth, written = read_star(particles), read_star(run / "poses.star", allow_absolute_paths=True)
    from cryofire.evaluate import poses_from_table, rotation_errors_deg

    assert np.max(rotation_errors_deg(poses_from_table(truth), poses_from_table(written))) < 1e-2
    assert np.allclose(truth["rlnOriginXAngst"], written["rlnOriginXAngst"], atol=1e-3)


def test_existing_run_needs_resume_flag(particles, tmp_path):
    train(particles, tmp_path / "run", small_config(epochs=1))
    from cryofire.errors import CryofireError

    with pytest.raises(CryofireError, match="--resume"):
        train(particles, tmp_path / "run", small_config(epochs=1))


def test_resume_with_other_options_is_refused(particles, tmp_path):
    from cryofire.errors import CryofireError

    partial = Trainer(particles, tmp_path / "run", small_config(epochs=1))
    partial.fit()
    with pytest.raises(CryofireError, match="learning_rate"):
        train(particles, tmp_path / "run", small_config(epochs=2, learning_rate=5e-4), resume=True)
