"""The Snakemake workflow: dry run and lint on the shipped config, config validation, and a tiny end-to-end run.

Snakemake is run as a subprocess from the repository root. Runs that write anything use `--directory <tmp>`:
`configfile: "config/config.yaml"` is then resolved in <tmp> (so a tiny config is put at <tmp>/config/config.yaml),
while the `validate()` schema, `include:`, `report:` and `conda:` paths stay relative to the files that name them
(the checkout). The end-to-end run also names its targets, so it builds only the tiny dataset whatever config the
workflow ends up merging. The SLURM profile's dry run needs snakemake-executor-plugin-slurm and is skipped without.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = shutil.which("snakemake", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed (pip install '.[workflow]')")

# ~150 images, box 32 -> 16, one epoch of a tiny model: every rule runs, in well under a minute of compute.
TINY_MODEL = {"encoder_channels": 8, "encoder_max_channels": 16, "encoder_hidden_dim": 32, "decoder_width": 32,
              "decoder_depth": 1, "num_fourier_features": 16, "search_rotations": 256}
TINY = {"datasets": {"tiny": {"simulate": {"n_images": 150, "box": 32, "snr": 1.0, "seed": 0},
                              "preprocess": {"box": 16},
                              "train": {"epochs": 1, "zdim": 2, "device": "cpu", "extra": TINY_MODEL},
                              "analyze": {"max_states": 2},
                              "volumes": {"steps": 3}}}}
STEPS = ("simulate", "preprocess", "backproject", "evaluate_backproject", "train", "analyze", "volumes",
         "evaluate_train", "report")
TINY_TARGETS = ("results/tiny/report.html", "results/tiny/backproject/consensus.mrc",
                "results/tiny/evaluate/backproject_metrics.json")


def _snakemake(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run snakemake from the repository root with this interpreter's bin/ first on PATH (for `cryofire`)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([SNAKEMAKE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _working_copy(tmp_path: Path, config: dict) -> Path:
    """A working directory whose config/config.yaml is `config`."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_dry_run_of_the_shipped_config_plans_every_step(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    result = _snakemake("-n", "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile"))
    assert result.returncode == 0, result.stderr + result.stdout
    log = result.stdout + result.stderr
    for step in STEPS:
        assert f"rule {step}:" in log, step
    assert "results/demo/evaluate/backproject_metrics.json" in log
    assert "results/demo/evaluate/train_metrics.json" in log and "results/demo/report.html" in log


def test_dry_run_in_the_checkout(tmp_path):
    """Exactly what a user types first (and what the workflow catalog runs)."""
    result = _snakemake("-n")
    assert result.returncode == 0, result.stderr + result.stdout


def test_lint_passes():
    result = _snakemake("--lint")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


@pytest.mark.parametrize("config, named", [
    ({"datasets": {"tiny": {"simulate": {"n_images": 10, "bogus_key": 3}}}}, "'bogus_key' was unexpected"),
    ({"datasets": {"tiny": {"simulate": {"n_images": 0}}}}, "['n_images']"),
    ({"preprocess": {"mask_radius": 1.5}}, "['mask_radius']"),
    ({"train": {"poses": "bogus"}}, "['poses']"),
    ({"train": {"epoch": 3}}, "'epoch' was unexpected"),
    ({"datasets": {"tiny": {"simulate": {}, "train": {"zdim": 0}}}}, "['zdim']"),
    ({"datasets": {"tiny": {"simulate": {}, "train": {"extra": {"epochs": 3}}}}}, "'epochs' is not one of"),
    ({"train": {"extra": {"encoder_channel": 8}}}, "'encoder_channel' is not one of"),
    ({"train": {"extra": {"encoder_channels": [8]}}}, "['encoder_channels']"),
    ({"volumes": {"steps": 1}}, "['steps']"),
])
def test_invalid_config_fails_naming_the_key(config, named, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(config))
    result = _snakemake("-n", "--configfile", str(extra))
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "Error validating config file" in log and named in log, log


def test_schema_lists_every_extra_train_option():
    """The schema's list of `train: extra:` names is exactly the train options the workflow does not manage."""
    from dataclasses import fields

    from cryofire.model import ModelConfig
    from cryofire.train.config import DERIVED_MODEL_OPTIONS, TrainConfig

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    train = schema["$defs"]["train"]["properties"]
    listed = set(train["extra"]["propertyNames"]["enum"])
    managed = set(train) - {"extra"}
    options = {f.name for f in fields(TrainConfig)} - {"model", "datadir"} | {f.name for f in fields(ModelConfig)}
    assert listed == options - managed - set(DERIVED_MODEL_OPTIONS)


def test_dataset_options_override_the_top_level_key_by_key(tmp_path):
    """A dataset's partial train/preprocess block keeps the other top-level values (not the schema defaults), the
    `extra` maps merge, and booleans become --name / --no-name."""
    config = {
        "datasets": {"tiny": {"simulate": {"n_images": 10},
                              "preprocess": {"box": 16},
                              "train": {"epochs": 3, "extra": {"decoder_width": 32, "symmetric_loss": False}},
                              "volumes": {"pc": 0}}},
        "preprocess": {"normalize": "dataset"},
        "train": {"zdim": 4, "learning_rate": 0.001, "extra": {"encoder_channels": 8}},
        "analyze": {"k": 3},
    }
    workdir = _working_copy(tmp_path, config)
    result = _snakemake("-n", "-p", "--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"))
    assert result.returncode == 0, result.stderr + result.stdout
    log = result.stdout + result.stderr
    train = next(line for line in log.splitlines() if "cryofire train" in line)
    for expected in ("--epochs 3", "--zdim 4", "--learning-rate 0.001", "--poses abinit", "--resume",
                     "--encoder-channels 8", "--decoder-width 32", "--no-symmetric-loss"):
        assert expected in train, (expected, train)
    preprocess = next(line for line in log.splitlines() if "cryofire preprocess" in line)
    assert "--normalize dataset" in preprocess and "--box 16" in preprocess
    assert "--k 3" in next(line for line in log.splitlines() if "cryofire analyze" in line)
    volume = next(line for line in log.splitlines() if "cryofire volume" in line)
    assert "--clusters" in volume and "--pc" not in volume


def test_training_and_volumes_ask_for_a_gpu_and_training_can_resume(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    result = _snakemake("-n", "-p", "--directory", str(tmp_path), "--snakefile", str(REPO / "Snakefile"))
    assert result.returncode == 0, result.stderr + result.stdout
    jobs = (result.stdout + result.stderr).split("\n\n")
    for rule in ("train", "volumes"):
        job = next(job for job in jobs if f"rule {rule}:" in job)
        assert "gpu=1" in job, job
    train = next(job for job in jobs if "rule train:" in job)
    # Outputs are the final files, never the run folder (Snakemake would delete its checkpoint before a retry).
    assert "output: results/demo/train/poses.star, results/demo/train/latents.npy, results/demo/train/weights.pt" \
        in train
    assert "--resume" in train


def test_profiles():
    """The workstation profile does not force conda; the SLURM profile has what a cluster run needs."""
    default = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert not {"use-conda", "software-deployment-method", "sdm"} & set(default)
    slurm = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert slurm["executor"] == "slurm" and slurm["jobs"] > 0 and slurm["retries"] >= 1 and slurm["rerun-incomplete"]
    assert not {"use-conda", "software-deployment-method", "sdm"} & set(slurm)
    for rule in ("train", "volumes"):
        resources = slurm["set-resources"][rule]
        # train: the GPU count comes from the rule (config `train: gpus`), so the profile must not override it.
        assert resources.get("gpu", 1) == 1 and resources["nodes"] == 1 and "slurm_partition" in resources
        assert "attempt" in str(resources["runtime"])
        assert resources["cpus_per_gpu"] >= slurm["set-threads"][rule]
    assert "gpu" not in slurm["set-resources"]["train"]


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install snakemake-executor-plugin-slurm")
    result = _snakemake("-n", "--workflow-profile", str(REPO / "profiles" / "slurm"))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "slurm_partition=gpu" in result.stdout + result.stderr


@pytest.mark.slow  # nine `cryofire` processes, each importing torch: ~1-2 min on two shared cores
def test_tiny_dataset_runs_through_every_rule(tmp_path):
    workdir = _working_copy(tmp_path, TINY)
    where = ("--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"))
    result = _snakemake(*where, "--cores", "2", *TINY_TARGETS, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = workdir / "results" / "tiny"
    metrics = json.loads((results / "evaluate" / "backproject_metrics.json").read_text())
    assert len(metrics["fsc"]["fsc"]) == 8  # box 16
    assert min(metrics["fsc"]["fsc"]) > 0.7, metrics["fsc"]["fsc"]  # the consensus map matches the truth
    for step in STEPS:
        assert (workdir / "logs" / "tiny" / f"{step}.log").is_file(), step
        assert (workdir / "benchmarks" / "tiny" / f"{step}.tsv").is_file(), step
    assert (results / "backproject" / "consensus_fsc.json").is_file()
    assert not (workdir / "results" / "demo").exists()

    # The trained run was scored against the simulated truth, and the report shows it.
    train_metrics = json.loads((results / "evaluate" / "train_metrics.json").read_text())
    assert train_metrics["n_images"] == 150 and "rotation_error_median_deg" in train_metrics
    assert "confusion_rate" in train_metrics
    page = (results / "report.html").read_text()
    assert "cryofire: tiny" in page and "rotation error" in page
    assert (results / "report.cxc").is_file()
    volumes = json.loads((results / "train" / "volumes" / "volumes.json").read_text())
    kinds = [entry["kind"] for entry in volumes["volumes"]]
    assert "cluster" in kinds and kinds.count("pc") == 3
    run_config = yaml.safe_load((results / "train" / "config.yaml").read_text())
    assert run_config["train"]["epochs"] == 1 and run_config["model"]["zdim"] == 2
    assert run_config["model"]["decoder_width"] == 32  # the `extra` map arrived

    again = _snakemake("-n", *where, *TINY_TARGETS)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # Snakemake's report of the run: the dataset's page and metrics, under the dataset's category.
    report = workdir / "workflow_report.html"
    built = _snakemake(*where, "--report", str(report), *TINY_TARGETS)
    assert built.returncode == 0, built.stderr[-3000:]
    text = report.read_text()
    assert "tiny" in text and "report.html" in text and "train_metrics.json" in text

    # A job that died after a checkpoint (scheduler kill, timeout) is rerun with its final outputs deleted by
    # Snakemake but the run folder's checkpoint.pt kept: training resumes from it instead of starting over.
    assert (results / "train" / "checkpoint.pt").is_file()
    for name in ("poses.star", "latents.npy", "weights.pt"):
        (results / "train" / name).unlink()
    rerun = _snakemake(*where, "--cores", "2", "results/tiny/train/weights.pt", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed at epoch 1" in (workdir / "logs" / "tiny" / "train.log").read_text()
    assert (results / "train" / "weights.pt").is_file()
