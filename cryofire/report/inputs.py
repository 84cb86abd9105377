"""Everything a report shows, read from a run folder and its companions; whatever is missing is recorded, not fatal.

Each loader returns None when its input is absent or unreadable and records one line saying why in
``ReportInputs.missing`` under the name of the section it feeds, so the page can say "not available" there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import yaml

from cryofire.errors import CryofireError, InputError
from cryofire.io import read_star
from cryofire.report.volumes import VolumeEntry, read_volume_index

_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, CryofireError, yaml.YAMLError)


@dataclass
class ReportInputs:
    """The files behind a report (None = not available, with the reason in `missing`).

    Attributes:
        run_dir: the training run folder.
        config: its config.yaml.
        log: the records of log.jsonl, in file order.
        particles: the particle table of the training data (config data.particles, else poses.star).
        poses: the inferred poses (poses.star).
        latents: (N, zdim) latents.
        analysis: analysis.json of `cryofire analyze`, its folder under key "folder" and its arrays under "arrays".
        volumes: the volumes of `cryofire volume`.
        metrics: (file name, content) of each metrics JSON of `cryofire evaluate`.
        preprocessing: the stack manifest of `cryofire preprocess` ("config", "input") and the raw particle table.
        missing: section name -> why (part of) it is not available.
    """

    run_dir: Path
    config: dict | None = None
    log: list[dict] = field(default_factory=list)
    particles: pd.DataFrame | None = None
    poses: pd.DataFrame | None = None
    latents: np.ndarray | None = None
    analysis: dict | None = None
    volumes: list[VolumeEntry] = field(default_factory=list)
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    preprocessing: dict | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)

    def attempt(self, section: str, load: Callable[..., Any], *args: Any) -> Any:
        """``load(*args)``, or None with the reason recorded under `section` when it fails."""
        try:
            return load(*args)
        except FileNotFoundError as error:
            self.missing.setdefault(section, []).append(f"{error.filename or error}: not found")
        except _READ_ERRORS as error:
            self.missing.setdefault(section, []).append(" ".join(str(error).split()) or type(error).__name__)
        return None


def read_yaml(path: Path) -> dict:
    """A YAML mapping; ValueError when the file holds something else."""
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    return values


def read_log(path: Path) -> list[dict]:
    """The JSON records of log.jsonl; a line cut short by a killed run is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def events(log: list[dict], name: str) -> list[dict]:
    """The records of event `name`, by images seen; where a resumed run logged the same point again, the last."""
    latest = {record.get("images_seen"): record for record in log if record.get("event") == name}
    return sorted(latest.values(), key=lambda record: record.get("images_seen") or 0)


def read_json(path: Path) -> dict:
    """A JSON object; ValueError when the file holds something else."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return payload


def read_latents(path: Path) -> np.ndarray:
    """The (N, zdim) latents of latents.npy; ValueError for a homogeneous run or another shape."""
    latents = np.load(path)
    if latents.ndim == 2 and latents.shape[1] == 0:
        raise ValueError(f"{path}: the run is homogeneous (zdim 0), it has no latent space")
    if latents.ndim != 2:
        raise ValueError(f"{path}: expected (N, zdim) latents, got shape {latents.shape}")
    return latents


def read_analysis(folder: Path) -> dict:
    """analysis.json plus the arrays it names that exist (labels, embedding, PCA projections, GMM labels)."""
    summary = read_json(folder / "analysis.json")
    files = {
        "labels": summary.get("kmeans", {}).get("labels_file", "labels.npy"),
        "embedding": summary.get("embedding", {}).get("file", "embedding.npy"),
        "embedding_indices": summary.get("embedding", {}).get("indices_file", "embedding_indices.npy"),
        "pca_projections": summary.get("pca", {}).get("projections_file", "pca_projections.npy"),
    }
    arrays = {name: np.load(folder / file) for name, file in files.items() if (folder / file).is_file()}
    return {**summary, "folder": folder, "arrays": arrays}


def preprocessing_manifest(particles: pd.DataFrame) -> dict:
    """The preprocessing settings recorded in the stack manifest beside the training stacks."""
    folder = Path(particles["image_path"].iloc[0]).parent
    for path in sorted(folder.glob("*stacks.json")):
        fingerprint = read_json(path).get("fingerprint", {})
        if isinstance(fingerprint.get("config"), dict):
            return {"config": fingerprint["config"], "input": fingerprint.get("input"), "manifest": path}
    raise InputError(folder, "no stack manifest of cryofire preprocess (*stacks.json) here",
                     "the training data was not made by cryofire preprocess, or give --preprocess-star")


def _training_particles(inputs: ReportInputs) -> pd.DataFrame | None:
    path = (inputs.config or {}).get("data", {}).get("particles")
    if path:
        table = inputs.attempt("dataset", read_star, Path(path), None, True)
        if table is not None:
            return table
    return inputs.poses


def _preprocessing(inputs: ReportInputs, raw_star: Path | None) -> dict | None:
    manifest = None
    if inputs.particles is not None:
        manifest = inputs.attempt("preprocessing", preprocessing_manifest, inputs.particles)
    elif raw_star is None:
        inputs.missing.setdefault("preprocessing", []).append("the training particles, whose stacks record their "
                                                              "preprocessing, are not readable")
    raw = raw_star or (Path(manifest["input"]) if manifest and manifest.get("input") else None)
    raw_table = inputs.attempt("preprocessing", read_star, raw, None, True) if raw else None
    if manifest is None and raw_table is None:
        return None
    return {**(manifest or {}), "raw_star": raw, "raw_table": raw_table}


def default_volume_folders(run_dir: Path) -> list[Path]:
    """<run>/volumes and its subfolders that hold a volumes.json (or <run>/volumes alone, to say it is missing)."""
    root = run_dir / "volumes"
    found = [path.parent for path in [root / "volumes.json", *sorted(root.glob("*/volumes.json"))] if path.is_file()]
    return found or [root]


def gather_inputs(
    run_dir: str | Path,
    analysis_dir: str | Path | None = None,
    volume_dirs: list[str | Path] | tuple = (),
    metrics: list[str | Path] | tuple = (),
    preprocess_star: str | Path | None = None,
) -> ReportInputs:
    """Read what exists of a run, its analysis (default <run>/analysis), the volumes listed in the volumes.json of
    each of `volume_dirs` (default :func:`default_volume_folders`) and the metrics files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder not found")
    inputs = ReportInputs(run_dir=run_dir)
    inputs.config = inputs.attempt("provenance", read_yaml, run_dir / "config.yaml")
    inputs.log = inputs.attempt("training", read_log, run_dir / "log.jsonl") or []
    inputs.poses = inputs.attempt("viewing directions", read_star, run_dir / "poses.star", None, True)
    inputs.latents = inputs.attempt("latent space", read_latents, run_dir / "latents.npy")
    inputs.particles = _training_particles(inputs)
    inputs.preprocessing = _preprocessing(inputs, Path(preprocess_star) if preprocess_star else None)
    analysis = Path(analysis_dir) if analysis_dir else run_dir / "analysis"
    inputs.analysis = inputs.attempt("latent space", read_analysis, analysis)
    for folder in [Path(f) for f in volume_dirs] or default_volume_folders(run_dir):
        inputs.volumes += inputs.attempt("volumes", read_volume_index, folder) or []
    for path in metrics:
        content = inputs.attempt("metrics", read_json, Path(path))
        if content is not None:
            inputs.metrics.append((Path(path).name, content))
    return inputs
