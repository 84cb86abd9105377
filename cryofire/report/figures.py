"""The report's plots, as matplotlib Figures (drawn by Agg on saving; pyplot and its global state are never used).

Every axis is labelled with its unit; colours of clusters are shared with the volume renderings and the ChimeraX
script (:func:`cluster_color`).
"""

from __future__ import annotations

import base64
import io
from functools import wraps
from typing import Callable

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter


MAX_SCATTER_POINTS = 30_000  # points drawn in a latent scatter plot (a seeded random subset beyond this)
DPI = 110
_STYLE = {
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "figure.facecolor": "white",
    "axes.prop_cycle": matplotlib.cycler(color=matplotlib.colormaps["tab10"].colors),
}


def cluster_color(index: int) -> tuple[float, float, float]:
    """RGB (0..1) of cluster `index` (0-based), from matplotlib's tab10 cycle."""
    return tuple(matplotlib.colormaps["tab10"].colors[index % 10])


def styled(build: Callable[..., Figure | None]) -> Callable[..., Figure | None]:
    """Run a figure builder under the report's matplotlib style."""

    @wraps(build)
    def run(*args, **kwargs):
        with matplotlib.rc_context(_STYLE):
            return build(*args, **kwargs)

    return run


def png_data_uri(figure: Figure) -> str:
    """The figure as a base64 PNG ``data:`` URI (white background, tight bounding box)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images seen, values) of the records holding a finite `key`."""
    pairs = [(r["images_seen"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and np.isfinite(r[key]) and "images_seen" in r]
    return (np.array([p[0] for p in pairs], float), np.array([p[1] for p in pairs], float)) if pairs \
        else (np.zeros(0), np.zeros(0))


def _loss_panel(ax, steps: list[dict], epochs: list[dict]) -> None:
    curves = [(steps, "loss", "training (per log interval)", {"lw": 0.8, "alpha": 0.6}),
              (epochs, "train_loss", "training (epoch mean)", {"marker": "o", "ms": 3}),
              (epochs, "val_loss", "validation (epoch)", {"marker": "s", "ms": 3, "ls": "--"})]
    values = []
    for records, key, label, style in curves:
        x, y = _series(records, key)
        if len(x):
            ax.plot(x, y, label=label, **style)
            values.append(y)
    low, high = (min(v.min() for v in values), max(v.max() for v in values)) if values else (0.0, 0.0)
    if low > 0 and high / low > 20:  # a log axis only where it helps
        ax.set_yscale("log")
    ax.set(title="Loss", ylabel="loss (mean squared Fourier error)")
    ax.legend(loc="upper right")


@styled
def training_curves(steps: list[dict], epochs: list[dict], box_size_px: int | None = None) -> Figure | None:
    """Loss, validation loss, mask radius, throughput and (when logged) rotation error against images seen.

    Args:
        steps, epochs: the "step" and "epoch" records of log.jsonl, by images seen.
        box_size_px: training box D, to mark the Nyquist radius D/2.
    """
    panels = [("loss", None)]
    radius = _series(steps, "radius_px") if steps else _series(epochs, "radius_px")
    for name, series in (("radius", radius), ("rate", _series(steps, "images_per_s")),
                         ("rotation", _series(epochs, "rotation_error_median_deg"))):
        if len(series[0]):
            panels.append((name, series))
    if not steps and not epochs:
        return None
    last_image = max(r.get("images_seen", 0) for r in steps + epochs) or 1
    rows = (len(panels) + 1) // 2
    figure = Figure(figsize=(10, 3.1 * rows))
    labels = {"radius": ("Frequency mask radius", "radius (px of the Fourier lattice)"),
              "rate": ("Throughput", "images / s"),
              "rotation": ("Rotation error vs ground truth", "median rotation error (°)")}
    for number, (name, series) in enumerate(panels, 1):
        ax = figure.add_subplot(rows, 2, number)
        if name == "loss":
            _loss_panel(ax, steps, epochs)
        else:
            ax.plot(*series, marker="o" if name == "rotation" else None, ms=3, color=f"C{number}")
            ax.set(title=labels[name][0], ylabel=labels[name][1])
            ax.set_ylim(bottom=0)
        if name == "radius" and box_size_px:
            ax.axhline(box_size_px / 2, color="0.5", ls=":", lw=1, label=f"Nyquist (D/2 = {box_size_px / 2:g} px)")
            ax.legend(loc="lower right")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set(xlabel="images seen", xlim=(0, last_image * 1.02))
    figure.tight_layout()
    return figure


@styled
def viewing_directions(rot_deg: np.ndarray, tilt_deg: np.ndarray, bins: int = 36) -> Figure:
    """Equal-area (Mollweide) histogram of projection directions: longitude = rot, latitude = 90° - tilt.

    Bins are equal in area (uniform in longitude and in sin(latitude)); colour = count / expected count if the
    directions were uniform on the sphere.
    """
    longitude = np.deg2rad((np.asarray(rot_deg, float) + 180.0) % 360.0 - 180.0)
    sin_latitude = np.cos(np.deg2rad(np.asarray(tilt_deg, float)))
    lon_edges = np.linspace(-np.pi, np.pi, bins + 1)
    sin_edges = np.linspace(-1.0, 1.0, bins // 2 + 1)
    counts, _, _ = np.histogram2d(longitude, sin_latitude, bins=(lon_edges, sin_edges))
    relative = counts.T / max(len(longitude) / counts.size, 1e-12)
    figure = Figure(figsize=(8, 4.2))
    ax = figure.add_subplot(projection="mollweide")
    mesh = ax.pcolormesh(lon_edges, np.arcsin(sin_edges), relative, cmap="viridis", shading="flat")
    ax.grid(True, color="white", alpha=0.35, lw=0.6)
    ax.tick_params(axis="x", colors="white", labelsize=7)
    ax.set_xlabel("rot: azimuth of the projection direction (°)")
    ax.set_ylabel("90° − tilt (°)")
    colorbar = figure.colorbar(mesh, ax=ax, shrink=0.7, pad=0.04)
    colorbar.set_label("particles per bin ÷ uniform expectation")
    return figure


def _plotted_subset(n: int) -> np.ndarray:
    if n <= MAX_SCATTER_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_SCATTER_POINTS, replace=False))


_AXIS_NAMES = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PC", "latent": "z"}


@styled
def latent_embedding(points: np.ndarray, method: str, labels: np.ndarray | None, pc1: np.ndarray | None
                     ) -> Figure:
    """Scatter of a 2D latent embedding coloured by cluster (when `labels`) and by PC1 coordinate (when `pc1`)."""
    keep = _plotted_subset(len(points))
    x, y = points[keep, 0], points[keep, 1]
    name = _AXIS_NAMES.get(method, method)
    flat = np.ptp(y) == 0
    if flat:  # a one-dimensional latent: spread the points vertically so that their density shows
        y = np.random.default_rng(0).uniform(-1.0, 1.0, len(x))
    panels = [p for p in (("cluster", labels), ("PC1", pc1)) if p[1] is not None]
    figure = Figure(figsize=(5.0 * max(len(panels), 1), 4.2))
    for number, (colour_by, values) in enumerate(panels, 1):
        ax = figure.add_subplot(1, len(panels), number)
        values = np.asarray(values)[keep]
        if colour_by == "cluster":
            for cluster in np.unique(values):
                chosen = values == cluster
                ax.scatter(x[chosen], y[chosen], s=3, alpha=0.6, lw=0, color=cluster_color(int(cluster)),
                           label=f"cluster {int(cluster)}", rasterized=True)
            ax.legend(markerscale=4, loc="best", frameon=True)
        else:
            order = np.argsort(values)
            scatter = ax.scatter(x[order], y[order], c=values[order], s=3, alpha=0.7, lw=0, cmap="viridis",
                                 rasterized=True)
            figure.colorbar(scatter, ax=ax, shrink=0.8).set_label("PC1 coordinate (latent units)")
        ax.set(title=f"coloured by {colour_by}", xlabel=f"{name}1 (arbitrary units)",
               ylabel="random jitter (no meaning)" if flat else f"{name}2 (arbitrary units)")
    figure.tight_layout()
    return figure


@styled
def cluster_sizes(sizes: list[int], bic: list[float] | None = None) -> Figure:
    """Bar chart of the particles per cluster and, when given, the mixture BIC against the number of states."""
    figure = Figure(figsize=(10 if bic and len(bic) > 1 else 5, 3.2))
    ax = figure.add_subplot(1, 2 if bic and len(bic) > 1 else 1, 1)
    total = max(sum(sizes), 1)
    bars = ax.bar(range(len(sizes)), sizes, color=[cluster_color(i) for i in range(len(sizes))])
    ax.bar_label(bars, labels=[f"{s} ({100 * s / total:.0f}%)" for s in sizes], fontsize=8)
    ax.set(title="Particles per cluster (k-means)", xlabel="cluster", ylabel="particles",
           xticks=range(len(sizes)))
    ax.margins(y=0.15)
    if bic and len(bic) > 1:
        ax = figure.add_subplot(1, 2, 2)
        states = np.arange(1, len(bic) + 1)
        ax.plot(states, bic, marker="o", ms=4)
        best = int(np.argmin(bic))
        ax.plot(states[best], bic[best], marker="o", ms=9, mfc="none", mec="C3", label="lowest BIC")
        ax.set(title="Gaussian mixture: BIC", xlabel="number of states", ylabel="BIC (lower is better)",
               xticks=states)
        ax.legend()
    figure.tight_layout()
    return figure


@styled
def fsc_curves(curves: list[tuple[str, list[float], list[float]]]) -> Figure:
    """FSC against spatial frequency (1/Å) for each (label, frequency, fsc), with the 0.5 and 0.143 thresholds."""
    figure = Figure(figsize=(6, 3.4))
    ax = figure.add_subplot()
    for label, frequency, fsc in curves:
        ax.plot(frequency, fsc, label=label.replace("$", r"\$"))  # a file name is not mathtext
    for threshold in (0.5, 0.143):
        ax.axhline(threshold, color="0.5", ls=":", lw=1)
        ax.annotate(f"{threshold:g}", (1.0, threshold), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom", ha="right", color="0.4")
    ax.set(title="Fourier shell correlation with the ground truth", xlabel="spatial frequency (1/Å)",
           ylabel="FSC", ylim=(-0.1, 1.05))
    ax.legend(loc="best")
    figure.tight_layout()
    return figure
