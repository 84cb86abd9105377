"""The sections about the data and the run: dataset, preprocessing, training, viewing directions, provenance.

Each ``*_section`` takes the gathered :class:`~cryofire.report.inputs.ReportInputs` and returns the section's body
HTML; what is missing is said in place.
"""

from __future__ import annotations

import shlex
import time

import numpy as np
import pandas as pd
import yaml

from cryofire.report import figures
from cryofire.report.html import duration, esc, figure, key_values, note, number, table, unavailable
from cryofire.report.inputs import ReportInputs, events

_OPTICS_HEADER = ("optics group", "particles", "pixel size", "box", "voltage", "Cs", "amplitude contrast",
                  "defocus min–max", "defocus median", "astigmatism (median |U − V|)")


def _defocus_um(table: pd.DataFrame) -> np.ndarray:
    """Mean defocus (U + V) / 2 of each particle, µm."""
    return (table["rlnDefocusU"].to_numpy(float) + table["rlnDefocusV"].to_numpy(float)) / 2e4


def _optics_row(group: int, rows: pd.DataFrame) -> tuple:
    first = rows.iloc[0]
    name = first.get("rlnOpticsGroupName", "")
    defocus = _defocus_um(rows)
    astigmatism = np.abs(rows["rlnDefocusU"].to_numpy(float) - rows["rlnDefocusV"].to_numpy(float))
    box = first["rlnImageSize"]
    return (esc(f"{group} {name}".strip()), number(len(rows)), number(float(first["rlnImagePixelSize"]), "Å", 4),
            number(int(box), "px") if pd.notna(box) else "–", number(float(first["rlnVoltage"]), "kV"),
            number(float(first["rlnSphericalAberration"]), "mm"),
            number(float(first["rlnAmplitudeContrast"]), "(fraction)"),
            f"{number(defocus.min())}–{number(defocus.max(), 'µm')}", number(float(np.median(defocus)), "µm"),
            number(float(np.median(astigmatism)), "Å"))


def dataset_section(inputs: ReportInputs) -> str:
    """Particles, box, pixel size, and per optics group the CTF parameters and ranges."""
    data = (inputs.config or {}).get("data", {})
    particles = inputs.particles
    rows = [("particle file", f"<code>{esc(data.get('particles', '–'))}</code>")]
    n = len(particles) if particles is not None else data.get("n_images")
    box = data.get("box_size") or (int(particles["rlnImageSize"].iloc[0]) if particles is not None else None)
    pixel = data.get("pixel_size_angstrom") or (float(particles["rlnImagePixelSize"].iloc[0])
                                                if particles is not None else None)
    rows += [("particles", number(n, "images")), ("box size", number(box, "px")),
             ("pixel size", number(pixel, "Å", 4))]
    if box and pixel:
        rows += [("box edge", number(box * pixel, "Å")), ("Nyquist resolution", number(2 * pixel, "Å"))]
    if "n_train" in data:
        rows.append(("training / validation split", f"{number(data['n_train'], 'images')} / "
                                                   f"{number(data.get('n_val', 0), 'images')}"))
    html = key_values(rows)
    if particles is None:
        reasons = inputs.missing.get("dataset", []) + inputs.missing.get("viewing directions", [])
        return html + unavailable("CTF and optics", reasons)
    groups = [_optics_row(int(group), rows) for group, rows in particles.groupby("rlnOpticsGroup")]
    html += "<h3>Optics groups and CTF</h3>" + table(groups, _OPTICS_HEADER)
    if inputs.particles is inputs.poses:
        html += note("CTF read from poses.star (the training particle file named in config.yaml is not readable).")
    return html


def preprocessing_section(inputs: ReportInputs) -> str:
    """Box and pixel size before and after preprocessing, and its settings."""
    info = inputs.preprocessing
    if info is None:
        return unavailable("Preprocessing settings", inputs.missing.get("preprocessing"))
    rows = []
    if info.get("raw_star"):
        rows.append(("input particle file", f"<code>{esc(info['raw_star'])}</code>"))
    raw, trained = info.get("raw_table"), inputs.particles
    if raw is not None and trained is not None:
        for label, column, unit in (("box size", "rlnImageSize", "px"), ("pixel size", "rlnImagePixelSize", "Å")):
            before, after = raw[column].iloc[0], trained[column].iloc[0]
            before, after = (value if pd.notna(value) else None for value in (before, after))
            rows.append((label, f"{number(before, unit, 4)} → {number(after, unit, 4)}"))
        rows.append(("particles", f"{number(len(raw), 'images')} → {number(len(trained), 'images')}"))
    config = info.get("config") or {}
    settings = {"normalize": ("normalisation", ""), "mask_radius_fraction": ("background circle radius", "× D/2"),
                "invert": ("contrast inverted", ""), "box_size": ("requested box size", "px")}
    rows += [(label, esc(config[key]) if isinstance(config[key], str) else number(config[key], unit))
             for key, (label, unit) in settings.items() if key in config]
    html = key_values(rows)
    if "preprocessing" in inputs.missing:
        html += unavailable("Part of the preprocessing record", inputs.missing["preprocessing"])
    return html


def _epoch_summary(log: list[dict]) -> list[tuple[str, str]]:
    epochs, steps, searches = events(log, "epoch"), events(log, "step"), events(log, "search")
    if not epochs:
        return [("epochs completed", number(0))]
    last = epochs[-1]
    rows = [("epochs completed", number(int(last["epoch"]))), ("images seen", number(int(last["images_seen"]))),
            ("final training loss", number(last.get("train_loss"), digits=4))]
    if "val_loss" in last:
        rows.append(("final validation loss", number(last["val_loss"], digits=4)))
    rows.append(("final mask radius", number(last.get("radius_px"), "px")))
    if steps:
        rate = float(np.median([r["images_per_s"] for r in steps if "images_per_s" in r]))
        rows.append(("throughput, median", number(rate, "images/s")))
    rows.append(("training time (sum of epochs)", duration(sum(r.get("epoch_seconds", 0.0) for r in epochs))))
    if searches:
        rows.append(("global pose searches", f"{number(len(searches))} "
                     f"({duration(sum(r.get('search_seconds', 0.0) for r in searches))} in all)"))
    if "rotation_error_median_deg" in last:
        rows.append(("rotation error, last epoch (median)", number(last["rotation_error_median_deg"], "°")))
    return rows


def training_section(inputs: ReportInputs) -> str:
    """Summary of the last epoch and the training curves."""
    if not inputs.log:
        return unavailable("Training log (log.jsonl)", inputs.missing.get("training"))
    box = (inputs.config or {}).get("data", {}).get("box_size")
    plot = figures.training_curves(events(inputs.log, "step"), events(inputs.log, "epoch"), box)
    caption = ("Loss per log interval and per epoch; the validation loss is measured on held-out images. The "
               "frequency mask radius grows with the schedule (Fourier lattice pixels; the Nyquist frequency is at "
               "D/2). The rotation error is measured against the true poses of a simulated dataset, after the best "
               "global rotation and hand.")
    return key_values(_epoch_summary(inputs.log)) + (figure(figures.png_data_uri(plot), "training curves",
                                                            esc(caption)) if plot else "")


def directions_section(inputs: ReportInputs) -> str:
    """Equal-area map of the inferred projection directions."""
    poses = inputs.poses
    if poses is None or "rlnAngleTilt" not in poses:
        return unavailable("Inferred poses (poses.star)", inputs.missing.get("viewing directions"))
    plot = figures.viewing_directions(poses["rlnAngleRot"].to_numpy(), poses["rlnAngleTilt"].to_numpy())
    caption = (f"Projection directions of the {len(poses):,} particles in the map's frame (RELION rot = azimuth, "
               "tilt = angle from the z axis), binned in equal-area cells; 1 means as many particles as uniformly "
               "spread directions would put there. Ab initio poses are defined up to a global rotation of the map, "
               "so only the spread, not the position, of the pattern is meaningful.")
    return figure(figures.png_data_uri(plot), "viewing directions", esc(caption))


def _run_times(log: list[dict]) -> list[tuple[str, str]]:
    times = [r["wall_time"] for r in log if isinstance(r.get("wall_time"), (int, float))]
    if not times:
        return []
    first = next((r for r in log if "wall_time" in r), {})
    started = first["wall_time"] - first.get("epoch_seconds", 0.0)
    stamp = lambda t: esc(time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t)))  # noqa: E731
    return [("first log record", stamp(started)), ("last log record", stamp(max(times))),
            ("elapsed (first to last record)", duration(max(times) - started))]


def _options_table(options: dict) -> str:
    rows = [(esc(key), esc(value if not isinstance(value, (dict, list)) else yaml.safe_dump(value).strip()))
            for key, value in options.items()]
    return table(rows, ("option", "value"), numeric_from=2)


def provenance_section(inputs: ReportInputs, paths: list[tuple[str, str]]) -> str:
    """Inputs of the report (`paths`: label, HTML), run times, command line, versions, options, config.yaml."""
    config = inputs.config
    html = key_values(paths + _run_times(inputs.log))
    if config is None:
        return html + unavailable("Run configuration (config.yaml)", inputs.missing.get("provenance"))
    command = config.get("command")
    if command:
        text = shlex.join(map(str, command)) if isinstance(command, list) else str(command)
        html += f"<h3>Command line</h3><pre>{esc(text)}</pre>"
    versions = config.get("versions") or {}
    if versions:
        html += "<h3>Software versions (training)</h3>" + table([(esc(k), esc(v)) for k, v in versions.items()],
                                                               ("package", "version"), numeric_from=2)
    html += '<div class="columns">'
    for name in ("train", "model"):
        if isinstance(config.get(name), dict):
            html += f"<div><h3>{esc(name.capitalize())} options</h3>{_options_table(config[name])}</div>"
    html += "</div>"
    full = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    return html + f"<details><summary>config.yaml in full</summary><pre>{esc(full)}</pre></details>"
