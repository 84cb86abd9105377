"""`cryofire report`: one self-contained HTML page about a run, and a ChimeraX script opening its state volumes.

The page embeds its images (PNG data: URIs) and its style, runs no script and loads nothing from the network; the
.mrc files are linked relative to the page's folder, so the page and the run can be moved together.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


from cryofire import __version__
from cryofire.errors import ConfigError, CryofireError
from cryofire.io import read_volume
from cryofire.io._files import atomic_output
from cryofire.report import results, sections
from cryofire.report.html import card, duration, esc, number, page
from cryofire.report.inputs import ReportInputs, default_volume_folders, events, gather_inputs
from cryofire.report.volumes import VolumeEntry, contour_level

_UNSAFE_IN_CHIMERAX = ('"', ";", "\n", "\r", "\t")  # cannot be quoted in a ChimeraX command line


def _first_metric(inputs: ReportInputs, key: str) -> float | None:
    for _, metrics in inputs.metrics:
        value = metrics.get(key, metrics.get("fsc", {}).get(key))
        if isinstance(value, (int, float)):
            return value
    return None


def _cards(inputs: ReportInputs) -> str:
    data = (inputs.config or {}).get("data", {})
    epochs = events(inputs.log, "epoch")
    n_images = len(inputs.particles) if inputs.particles is not None else data.get("n_images")
    cards = [("particles", number(n_images)), ("box", number(data.get("box_size"), "px")),
             ("pixel size", number(data.get("pixel_size_angstrom"), "Å", 4)),
             ("epochs", number(int(epochs[-1]["epoch"]) if epochs else None)),
             ("training time", duration(sum(r.get("epoch_seconds", 0.0) for r in epochs)) if epochs else "–")]
    if inputs.analysis is not None:
        cards.append(("k-means clusters", number(inputs.analysis.get("kmeans", {}).get("k"))))
    for key, label, unit, scale in (("rotation_error_median_deg", "rotation error (median)", "°", 1.0),
                                    ("confusion_rate", "class confusion", "%", 100.0),
                                    ("resolution_fsc0.5_angstrom", "FSC 0.5 vs truth", "Å", 1.0)):
        value = _first_metric(inputs, key)
        if value is not None:
            cards.append((label, number(value * scale, unit)))
    return "".join(card(label, value) for label, value in cards)


def render_report(inputs: ReportInputs, report_dir: Path, title: str | None = None,
                  input_paths: list[tuple[str, str]] = ()) -> str:
    """The report page of gathered `inputs`, with links relative to `report_dir`."""
    run = inputs.run_dir.resolve()
    parts = [
        ("dataset", "Dataset", sections.dataset_section(inputs)),
        ("preprocessing", "Preprocessing", sections.preprocessing_section(inputs)),
        ("training", "Training", sections.training_section(inputs)),
        ("directions", "Viewing directions", sections.directions_section(inputs)),
        ("latent", "Latent space", results.latent_section(inputs, report_dir)),
        ("volumes", "State volumes", results.volumes_section(inputs, report_dir)),
        ("trajectories", "PC trajectories", results.trajectories_section(inputs, report_dir)),
        ("metrics", "Metrics vs ground truth", results.metrics_section(inputs)),
        ("provenance", "Provenance", sections.provenance_section(inputs, list(input_paths))),
    ]
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return page(title or f"cryofire run {run.parent.name}/{run.name}", f"{run}", _cards(inputs), parts,
                f"Made by cryofire {__version__} on {generated}. Self-contained: figures are embedded, and the "
                "map links are relative to this file's folder.")


def chimerax_script(volumes: list[VolumeEntry], script: Path) -> str:
    """The text of ChimeraX script `script` (.cxc): `volumes` side by side, at the report's levels and colours.

    Paths are relative to the script's folder (ChimeraX runs a script from there). Volumes whose path cannot be
    quoted on a ChimeraX command line, or that cannot be read, are left out with a comment.
    """
    script_dir = Path(script).parent
    lines = ["# ChimeraX script from `cryofire report`: the state volumes side by side, at the report's levels.",
             "# Run it in a fresh ChimeraX session (`chimerax <this file>`): models are numbered as opened."]
    model = 0
    for position, entry in enumerate(volumes):
        relative = Path(os.path.relpath(entry.path.resolve(), script_dir.resolve())).as_posix()
        if any(character in relative for character in _UNSAFE_IN_CHIMERAX):
            lines.append(f"# left out volume {position + 1}: its path cannot be quoted in a ChimeraX command")
            continue
        try:
            level = contour_level(read_volume(entry.path)[0])
        except (OSError, ValueError, CryofireError):
            lines.append(f"# left out volume {position + 1}: not readable")
            continue
        model += 1
        colour = results.colour_hex(results.cluster_index(entry, position))
        lines += [f'open "{relative}"', f"volume #{model} style surface level {level:.6g} color {colour}"]
    if model:
        lines += ["tile", "view"]
    return "\n".join(lines) + "\n"


def write_report(
    run_dir: str | Path,
    out: str | Path,
    analysis_dir: str | Path | None = None,
    volume_dirs: list[str | Path] | tuple = (),
    metrics: list[str | Path] | tuple = (),
    preprocess_star: str | Path | None = None,
    title: str | None = None,
) -> tuple[Path, Path]:
    """Write the report page `out` (.html) and the ChimeraX script beside it (same name, .cxc), atomically.

    Returns ``(page, script)``. Missing inputs are reported on the page, not raised; only an absent run folder or
    a bad output name is an error.
    """
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"-o {out}: the report is an HTML file; give a name ending in .html")
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = gather_inputs(run_dir, analysis_dir, volume_dirs, metrics, preprocess_star)
    used = [("run folder", Path(run_dir)), ("analysis folder", Path(analysis_dir or Path(run_dir) / "analysis")),
            *(("volumes folder", Path(path)) for path in volume_dirs or default_volume_folders(Path(run_dir))),
            *(("metrics file", Path(path)) for path in metrics)]
    input_paths = [(label, f"<code>{esc(path.resolve())}</code>") for label, path in used]
    text = render_report(inputs, out.parent, title, input_paths)
    with atomic_output(out) as temporary:
        temporary.write_text(text, encoding="utf-8")
    script = out.with_suffix(".cxc")
    with atomic_output(script) as temporary:
        temporary.write_text(chimerax_script(results.state_volumes(inputs), script), encoding="utf-8")
    return out, script
