"""The Snakemake workflow: dry run and lint on the shipped config, config validation, and a tiny end-to-end run.

Snakemake is run as a subprocess from the repository root. Runs that write anything use `--directory <tmp>`:
`configfile: "config/config.yaml"` is then resolved in <tmp> (so a tiny config is put at <tmp>/config/config.yaml),
while the `validate()` schema, `include:`, `report:` and `conda:` paths stay relative to the files that name them
(the checkout). The end-to-end run also names its target, so it builds only the tiny dataset whatever config the
workflow ends up merging.
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

TINY = {"datasets": {"tiny": {"simulate": {"n_images": 200, "box": 32, "snr": 1.0, "seed": 0},
                              "preprocess": {"box": 16}}}}
STEPS = ("simulate", "preprocess", "backproject", "evaluate_backproject")


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
])
def test_invalid_config_fails_naming_the_key(config, named, tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(config))
    result = _snakemake("-n", "--configfile", str(extra))
    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert "Error validating config file" in log and named in log, log


@pytest.mark.slow  # four `cryofire` processes, each importing torch: ~20-30 s on two shared cores
def test_tiny_dataset_runs_through_every_rule(tmp_path):
    workdir = _working_copy(tmp_path, TINY)
    target = "results/tiny/evaluate/backproject_metrics.json"
    args = ("--directory", str(workdir), "--snakefile", str(REPO / "Snakefile"), "--cores", "2", target)
    result = _snakemake(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((workdir / target).read_text())
    assert len(metrics["fsc"]["fsc"]) == 8  # box 16
    assert min(metrics["fsc"]["fsc"]) > 0.7, metrics["fsc"]["fsc"]  # the consensus map matches the truth
    for step in STEPS:
        assert (workdir / "logs" / "tiny" / f"{step}.log").is_file(), step
        assert (workdir / "benchmarks" / "tiny" / f"{step}.tsv").is_file(), step
    assert (workdir / "results" / "tiny" / "backproject" / "consensus_fsc.json").is_file()
    assert not (workdir / "results" / "demo").exists()
    again = _snakemake("-n", *args)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
