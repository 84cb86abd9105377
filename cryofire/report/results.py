"""The sections about the results: latent space, state volumes, principal-component trajectories, metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryofire.analysis.latents import fit_pca
from cryofire.errors import CryofireError
from cryofire.io import read_volume
from cryofire.report import figures
from cryofire.report.html import esc, figure, file_link, key_values, note, number, table, unavailable
from cryofire.report.inputs import ReportInputs
from cryofire.report.volumes import VolumeEntry, contour_level, trajectory_strip, volume_panel

# Metrics of `cryofire evaluate`: key -> (label, unit, scale). Other keys get their unit from their suffix.
METRIC_LABELS = {
    "rotation_error_median_deg": ("rotation error, median (after global alignment)", "°", 1.0),
    "rotation_error_mean_deg": ("rotation error, mean", "°", 1.0),
    "rotation_error_p90_deg": ("rotation error, 90th percentile", "°", 1.0),
    "shift_error_median_px": ("shift error, median", "px", 1.0),
    "shift_error_mean_px": ("shift error, mean", "px", 1.0),
    "shift_error_aligned_median_px": ("shift error, median (after removing the map's global offset)", "px", 1.0),
    "mirrored_hand": ("map hand mirrored relative to the truth", "", 1.0),
    "n_images": ("images compared", "images", 1.0),
    "confusion_rate": ("class confusion (particles misassigned)", "%", 100.0),
    "resolution_fsc0.5_angstrom": ("resolution at FSC = 0.5", "Å", 1.0),
    "resolution_fsc0.143_angstrom": ("resolution at FSC = 0.143", "Å", 1.0),
    "nyquist_angstrom": ("Nyquist resolution", "Å", 1.0),
}
_SUFFIX_UNITS = {"_deg": "°", "_px": "px", "_angstrom": "Å", "_seconds": "s", "_s": "s", "_rate": "(fraction)",
                 "_fraction": "(fraction)"}


def colour_hex(index: int) -> str:
    """The colour of cluster `index` as #rrggbb."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in figures.cluster_color(index))


def _swatch(index: int) -> str:
    return f'<span class="swatch" style="background:{colour_hex(index)}"></span>'


def _latent_views(inputs: ReportInputs) -> dict | None:
    """Embedding points and method, k-means labels, PC1 coordinates and PCA variance, from the analysis when
    present, else computed here from the latents (first two principal components, no clusters); None if neither."""
    analysis = inputs.analysis
    if analysis is not None and "embedding" in analysis["arrays"]:
        arrays = analysis["arrays"]
        indices = arrays.get("embedding_indices", np.arange(len(arrays["embedding"])))
        pcs = arrays.get("pca_projections")
        labels = arrays.get("labels")
        return {"points": arrays["embedding"], "method": analysis.get("embedding", {}).get("method", "embedding"),
                "labels": labels[indices] if labels is not None else None,
                "pc1": pcs[indices, 0] if pcs is not None else None,
                "explained": analysis.get("pca", {}).get("explained_variance_ratio")}
    if inputs.latents is None:
        return None
    pca = fit_pca(inputs.latents)
    projected = pca.project(inputs.latents)
    points = np.zeros((len(projected), 2))
    points[:, : min(2, projected.shape[1])] = projected[:, :2]
    return {"points": points, "method": "pca", "labels": None, "pc1": projected[:, 0],
            "explained": pca.explained_variance_ratio.tolist()}


def _variance_table(explained: list[float]) -> str:
    cumulative = np.cumsum(explained)
    rows = [(esc(f"PC{i + 1}"), number(100 * v, "%"), number(100 * c, "%"))
            for i, (v, c) in enumerate(zip(explained[:8], cumulative))]
    return table(rows, ("component", "variance explained", "cumulative"))


def _clusters(analysis: dict, report_dir: Path) -> str:
    kmeans, gmm = analysis.get("kmeans", {}), analysis.get("gmm", {})
    sizes = kmeans.get("sizes")
    if not sizes:
        return ""
    plot = figures.cluster_sizes(sizes, gmm.get("bic"))
    stars = kmeans.get("star_files") or []
    rows = [(f"{_swatch(i)}{number(i)}", number(size, "particles"), number(100 * size / sum(sizes), "%"),
             file_link(analysis["folder"] / stars[i], report_dir) if i < len(stars) else "–")
            for i, size in enumerate(sizes)]
    k_from = {"--k": "set with --k", "gmm n_states": "the number of states the mixture's BIC chose"}
    caption = (f"k-means with k = {len(sizes)} ({k_from.get(kmeans.get('k_from'), 'as given')}); the Gaussian "
               f"mixture with the lowest BIC has {gmm.get('n_states', '?')} states.")
    return (figure(figures.png_data_uri(plot), "cluster sizes", esc(caption))
            + table(rows, ("cluster", "particles", "share", "particles (RELION .star)"), numeric_from=1))


def latent_section(inputs: ReportInputs, report_dir: Path) -> str:
    """Embedding, PCA and clusters of the latents (the first two PCs alone without an analysis)."""
    views = _latent_views(inputs)
    if views is None:
        return unavailable("Latents (latents.npy) and their embedding", inputs.missing.get("latent space"))
    html = ""
    if inputs.analysis is None:
        html += unavailable("Latent analysis (cryofire analyze)", inputs.missing.get("latent space"))
        html += note("Shown instead: the first two principal components of the latents, computed for this report.")
    summary = [("particles", number(len(views["points"]), "embedded")),
               ("latent dimension", number(inputs.latents.shape[1] if inputs.latents is not None
                                           else inputs.analysis.get("zdim")))]
    if inputs.analysis is not None:
        summary.append(("2D embedding", esc(inputs.analysis.get("embedding", {}).get("note", views["method"]))))
    plot = figures.latent_embedding(views["points"], views["method"], views["labels"], views["pc1"])
    caption = ("Each point is one particle's latent in a 2D embedding, coloured by its k-means cluster and by its "
               "coordinate along the first principal component of the latents.")
    html += key_values(summary) + figure(figures.png_data_uri(plot), "latent embedding", esc(caption))
    if views["explained"]:
        html += "<h3>Principal components of the latents</h3>" + _variance_table(views["explained"])
    if inputs.analysis is not None:
        html += "<h3>Clusters</h3>" + _clusters(inputs.analysis, report_dir)
    return html


def cluster_index(entry: VolumeEntry, position: int) -> int:
    """The k-means cluster of a state volume (its 'cluster' entry), else its `position` among the state volumes."""
    cluster = entry.info.get("cluster")
    return cluster if isinstance(cluster, int) else position


def state_volumes(inputs: ReportInputs) -> list[VolumeEntry]:
    """The listed volumes that are not on a PC trajectory (clusters, given latents, a homogeneous map)."""
    return [entry for entry in inputs.volumes if entry.trajectory is None]


def _volume_block(entry: VolumeEntry, position: int, report_dir: Path) -> str:
    try:
        volume, voxel = read_volume(entry.path)
    except (OSError, ValueError, CryofireError) as error:
        return f"<h3>{esc(entry.label)}</h3>" + unavailable("This volume", [" ".join(str(error).split())])
    level = contour_level(volume)
    rows = [("box", number(volume.shape[-1], "px")), ("voxel size", number(voxel, "Å", 4)),
            ("contour level shown", number(level, "(density units)")), ("kind", esc(entry.kind))]
    if entry.z is not None:
        rows.append(("latent z", esc(", ".join(f"{value:.3g}" for value in entry.z[:8])
                                     + (", …" if len(entry.z) > 8 else ""))))
    plot = volume_panel(volume, figures.cluster_color(cluster_index(entry, position)), level)
    return (f'<h3>{_swatch(cluster_index(entry, position))}{esc(entry.label)}'
            f'<span class="links">{file_link(entry.path, report_dir)}</span></h3>'
            + key_values(rows) + figure(figures.png_data_uri(plot), f"volume {entry.label}"))


def volumes_section(inputs: ReportInputs, report_dir: Path) -> str:
    """Each state volume: its file, size, level, latent, and its views."""
    states = state_volumes(inputs)
    if not states:
        return unavailable("State volumes (cryofire volume)", inputs.missing.get("volumes")
                           or ["volumes.json lists no state volumes"])
    intro = note("Surface: a depth-shaded rendering of the map above its contour level (mean + 2.5 standard "
                 "deviations), seen obliquely. Slices and projections: through and along each axis of the box. "
                 "Open the maps side by side in ChimeraX with the .cxc script next to this report.")
    return intro + "".join(_volume_block(entry, i, report_dir) for i, entry in enumerate(states))


def _trajectory_block(pc: int, entries: list[VolumeEntry], explained: list[float] | None, report_dir: Path) -> str:
    entries = sorted(entries, key=lambda e: e.info.get("percentile", 0.0))  # stable: file order without one
    try:
        volumes = [read_volume(entry.path)[0] for entry in entries]
    except (OSError, ValueError, CryofireError) as error:
        return f"<h3>PC{pc}</h3>" + unavailable("This trajectory", [" ".join(str(error).split())])
    titles = [f"{e.info['percentile']:g}th pct" if isinstance(e.info.get("percentile"), (int, float))
              else f"step {i + 1}" for i, e in enumerate(entries)]
    plot = trajectory_strip(volumes, titles, figures.cluster_color(pc - 1))
    share = f", {100 * explained[pc - 1]:.3g}% of the latent variance" if explained and pc <= len(explained) else ""
    links = " ".join(file_link(entry.path, report_dir, entry.path.name) for entry in entries)
    caption = (f"Volumes decoded along principal component {pc}{share}, left to right; columns are labelled by the "
               "percentile of the particles' PC coordinate.")
    return (f"<h3>PC{pc}</h3>" + figure(figures.png_data_uri(plot), f"trajectory along PC{pc}", esc(caption))
            + f"<details><summary>maps (.mrc)</summary><p>{links}</p></details>")


def trajectories_section(inputs: ReportInputs, report_dir: Path) -> str:
    """One image strip per principal component with trajectory volumes."""
    groups: dict[int, list[VolumeEntry]] = {}
    for entry in inputs.volumes:
        if entry.trajectory is not None:
            groups.setdefault(entry.trajectory, []).append(entry)
    if not groups:
        return unavailable("Principal-component trajectories (cryofire volume)",
                           inputs.missing.get("volumes") or ["volumes.json lists no trajectory volumes"])
    explained = (inputs.analysis or {}).get("pca", {}).get("explained_variance_ratio")
    return "".join(_trajectory_block(pc, entries, explained, report_dir) for pc, entries in sorted(groups.items()))


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    scalars = {**{k: v for k, v in metrics.get("fsc", {}).items() if not isinstance(v, (list, dict))},
               **{k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}}
    rows = []
    for key, value in scalars.items():
        label, unit, scale = METRIC_LABELS.get(key, (key.replace("_", " "), "", 1.0))
        unit = unit or next((u for suffix, u in _SUFFIX_UNITS.items() if key.endswith(suffix)), "")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value * scale if scale != 1.0 else value
        rows.append((label, number(value, unit, 4) if not isinstance(value, str) else esc(value)))
    return rows


def _confusion(classes: dict) -> str:
    predicted, true, matrix = classes.get("predicted_classes"), classes.get("true_classes"), classes.get("matrix")
    if not (predicted and true and matrix):
        return ""
    rows = [(esc(f"predicted {p}"), *(number(int(c), "particles") for c in row)) for p, row in zip(predicted, matrix)]
    return "<p>Particles per (predicted, true) class:</p>" + table(rows, ("", *(esc(f"true {t}") for t in true)))


def _state_fsc(states: list[dict], name: str, curves: list) -> str:
    """Per-state FSC of the cluster maps against the true state maps: a table, and curves added to `curves`."""
    rows = []
    for state in states:
        label = f"cluster {state['cluster']} vs true state {state['true_class']}"
        rows.append((esc(label), number(state["resolution_fsc0.5_angstrom"], "Å", 4),
                     number(state["resolution_fsc0.143_angstrom"], "Å", 4)))
        curves.append((f"{name}: {label}", state["frequency_per_angstrom"], state["fsc"]))
    if not rows:
        return ""
    return "<p>Cluster maps against the true state maps:</p>" + table(
        rows, ("", "resolution at FSC = 0.5", "resolution at FSC = 0.143"))


def metrics_section(inputs: ReportInputs) -> str:
    """Each metrics file as a table with units, its confusion matrix, and all FSC curves in one plot."""
    if not inputs.metrics:
        return unavailable("Metrics against ground truth (cryofire evaluate)",
                           inputs.missing.get("metrics") or ["no --metrics file given"])
    html, curves = "", []
    for name, metrics in inputs.metrics:
        html += f"<h3><code>{esc(name)}</code></h3>" + key_values(_metric_rows(metrics))
        html += _confusion(metrics.get("classes", {}))
        fsc = metrics.get("fsc", {})
        if fsc.get("frequency_per_angstrom") and fsc.get("fsc"):
            curves.append((name, fsc["frequency_per_angstrom"], fsc["fsc"]))
        html += _state_fsc(metrics.get("state_fsc", []), name, curves)
    if curves:
        html += figure(figures.png_data_uri(figures.fsc_curves(curves)), "FSC curves")
    if "metrics" in inputs.missing:
        html += unavailable("Some metrics files", inputs.missing["metrics"])
    return html
