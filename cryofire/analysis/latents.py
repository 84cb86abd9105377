"""Latent-space analysis of a trained run (`cryofire analyze`): PCA, a 2D embedding, k-means, a Gaussian mixture.

Everything works on the latents as the decoder sees them (no standardisation), so Euclidean distances and cluster
centres are points a volume can be rendered from.

* PCA: exact, from the covariance matrix; each component's largest entry is made positive, so the result does not
  depend on the eigen-solver's sign choice.
* Embedding: UMAP when the optional ``umap`` package is importable (all points); else t-SNE on at most
  ``max_embedding_points`` particles (a seeded random subset when there are more); else, with too few particles
  for t-SNE, the first two PCs. A latent of one or two dimensions is its own embedding (method ``'latent'``; for
  zdim = 1 the second column is 0): a nonlinear map of it would only distort it.
* Gaussian mixture: full covariances, 1..max_states components, the number with the lowest BIC is kept; fitted on
  at most 100 000 particles (a seeded random subset when there are more), then every particle is labelled.
* k-means: ``k`` from the caller, by default the mixture's number of states.
Labels are renumbered so that cluster 0 is the largest.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.mixture import GaussianMixture

from cryofire.errors import ConfigError, CryofireError, InputError
from cryofire.io import read_star, write_star
from cryofire.io._files import atomic_output
from cryofire.train.outputs import save_npy

TRAJECTORY_PERCENTILES = (5.0, 95.0)  # range of a PC trajectory, percentiles of the particles' PC coordinate
MIN_TSNE_POINTS = 50  # fewer particles than this: the embedding falls back to PCA
TSNE_PERPLEXITY = 30.0
TRAJECTORY_STEPS = 10  # points per PC trajectory written by analyze_run


@dataclass(frozen=True)
class Pca:
    """Principal components of latents.

    Attributes:
        mean: (zdim,) mean latent.
        components: (zdim, zdim) unit principal directions, one per row, by decreasing variance.
        explained_variance_ratio: (zdim,) fraction of the total variance along each component (0 if none).
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    def project(self, latents: np.ndarray) -> np.ndarray:
        """(N, zdim) latents -> (N, zdim) coordinates along the components."""
        return (np.asarray(latents, np.float64) - self.mean) @ self.components.T


@dataclass(frozen=True)
class Embedding:
    """A 2D view of the latents.

    Attributes:
        points: (M, 2) embedded coordinates.
        indices: (M,) particle indices the rows belong to (all particles unless subsampled), increasing.
        method: 'umap', 'tsne', 'pca' or 'latent'.
        note: one sentence on how it was made (subsampling, fall-backs).
    """

    points: np.ndarray
    indices: np.ndarray
    method: str
    note: str


def fit_pca(latents: np.ndarray) -> Pca:
    """Exact PCA of (N, zdim) latents, with the sign convention of the module docstring."""
    values = np.asarray(latents, np.float64)
    mean = values.mean(axis=0)
    covariance = np.atleast_2d(np.cov(values - mean, rowvar=False, bias=True))
    variances, vectors = np.linalg.eigh(covariance)
    order = np.argsort(variances)[::-1]
    variances, components = np.clip(variances[order], 0.0, None), vectors[:, order].T
    largest = np.argmax(np.abs(components), axis=1)
    components *= np.sign(components[np.arange(len(components)), largest])[:, None]
    total = variances.sum()
    ratio = variances / total if total > 0 else np.zeros_like(variances)
    return Pca(mean=mean, components=components, explained_variance_ratio=ratio)


def pc_trajectory(latents: np.ndarray, pca: Pca, pc: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Latents along principal component `pc` (1-based), from its 5th to its 95th percentile.

    Returns:
        ``(points, percentiles)``: (steps, zdim) latents ``mean + c * component`` with ``c`` the particles'
        coordinate at evenly spaced percentiles, and those (steps,) percentiles.
    """
    zdim = pca.components.shape[0]
    if not 1 <= pc <= zdim:
        raise ConfigError(f"--pc {pc}: the latent has {zdim} principal components (1..{zdim})")
    if steps < 2:
        raise ConfigError(f"--steps {steps}: a trajectory needs at least 2 steps")
    percentiles = np.linspace(*TRAJECTORY_PERCENTILES, steps)
    coordinates = np.percentile(pca.project(latents)[:, pc - 1], percentiles)
    return pca.mean + coordinates[:, None] * pca.components[pc - 1], percentiles


def seeded_subset(n: int, max_points: int, seed: int) -> np.ndarray:
    """Increasing indices of at most `max_points` of `n` items: all of them, or a random subset fixed by `seed`."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def embed_2d(latents: np.ndarray, seed: int, max_embedding_points: int = 20_000) -> Embedding:
    """A 2D embedding of (N, zdim) latents, chosen as in the module docstring."""
    n, zdim = latents.shape
    if zdim <= 2:
        points = np.zeros((n, 2))
        points[:, :zdim] = latents
        return Embedding(points, np.arange(n), "latent", f"the {zdim}-dimensional latent itself"
                         + (" (second axis 0)" if zdim == 1 else ""))
    if importlib.util.find_spec("umap") is not None:
        import umap

        points = umap.UMAP(n_components=2, random_state=seed).fit_transform(latents)
        return Embedding(points, np.arange(n), "umap", f"UMAP of all {n} particles")
    indices = seeded_subset(n, max_embedding_points, seed)
    if len(indices) < MIN_TSNE_POINTS:
        points = fit_pca(latents).project(latents[indices])[:, :2]
        return Embedding(points, indices, "pca", f"first two PCs: {len(indices)} particles are too few for t-SNE")
    perplexity = min(TSNE_PERPLEXITY, (len(indices) - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    points = tsne.fit_transform(np.asarray(latents[indices], np.float64))
    subset = f"a random subset of {len(indices)} of {n} particles (seed {seed})" if len(indices) < n else \
        f"all {n} particles"
    return Embedding(points, indices, "tsne", f"t-SNE (umap not installed) of {subset}")


def relabel_by_size(labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters so that 0 is the largest (ties: the lower old label first).

    Returns:
        ``(new_labels, old_of_new)``: (N,) labels and (n_clusters,) the old label of each new one.
    """
    sizes = np.bincount(labels, minlength=n_clusters)
    old_of_new = np.argsort(-sizes, kind="stable")
    new_of_old = np.empty(n_clusters, dtype=np.int64)
    new_of_old[old_of_new] = np.arange(n_clusters)
    return new_of_old[labels], old_of_new


def check_cluster_count(k: int, n_particles: int) -> None:
    """ConfigError unless 1 <= k <= n_particles."""
    if not 1 <= k <= n_particles:
        raise ConfigError(f"--k {k}: need 1 <= k <= the number of particles ({n_particles})")


def kmeans(latents: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of (N, zdim) latents: (N,) labels (0 the largest cluster) and (k, zdim) cluster means."""
    check_cluster_count(k, len(latents))
    model = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(np.asarray(latents, np.float64))
    labels, old_of_new = relabel_by_size(model.labels_, k)
    return labels, model.cluster_centers_[old_of_new]


def nearest_particles(latents: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(k,) index of the particle whose latent is nearest (Euclidean) to each of the (k, zdim) points."""
    nearest = np.empty(len(points), dtype=np.int64)
    for row, point in enumerate(np.asarray(points, np.float64)):
        nearest[row] = np.argmin(np.square(latents - point).sum(axis=1))
    return nearest


def gaussian_mixture_by_bic(
    latents: np.ndarray, max_states: int, seed: int, max_fit_points: int = 100_000
) -> tuple[np.ndarray, list[float], int]:
    """Fit mixtures of 1..max_states full-covariance Gaussians and keep the one with the lowest BIC.

    Returns:
        ``(labels, bic, n_states)``: (N,) labels of every particle (0 the largest state), the BIC of each number
        of components (1, 2, ...; on the fitted particles, lower is better) and the chosen number.
    """
    if max_states < 1:
        raise ConfigError(f"--max-states {max_states}: must be at least 1")
    values = np.asarray(latents, np.float64)
    fit = values[seeded_subset(len(values), max_fit_points, seed)]
    models, bic = [], []
    for n_components in range(1, min(max_states, len(fit)) + 1):
        models.append(GaussianMixture(n_components, covariance_type="full", random_state=seed).fit(fit))
        bic.append(float(models[-1].bic(fit)))
    best = int(np.argmin(bic))
    labels, _ = relabel_by_size(models[best].predict(values), best + 1)
    return labels, bic, best + 1


def load_latents(run_dir: str | Path) -> np.ndarray:
    """The (N, zdim) float32 latents of a trained run (``latents.npy``, input order); zdim must be at least 1."""
    path = Path(run_dir) / "latents.npy"
    if not path.is_file():
        raise InputError(path, "not found", "is this the folder of a finished `cryofire train` run?")
    latents = np.load(path)
    if latents.ndim != 2 or len(latents) == 0:
        raise InputError(path, f"expected an (N, zdim) array of latents, got shape {latents.shape}")
    if latents.shape[1] == 0:
        raise CryofireError(f"{path}: the run is homogeneous (zdim 0); it has no latents to analyse")
    if not np.isfinite(latents).all():
        raise InputError(path, "holds NaN or infinite latents")
    return latents


@dataclass(frozen=True)
class LatentAnalysis:
    """The results of :func:`analyze_latents` for N particles with zdim-dimensional latents.

    Attributes:
        pca: the principal components.
        embedding: the 2D view.
        labels: (N,) k-means labels, 0 the largest cluster.
        center_indices: (k,) the particle nearest each k-means centre.
        k_from: where k came from: '--k' or 'gmm n_states'.
        gmm_labels: (N,) labels of the mixture chosen by BIC, 0 the largest state.
        bic: BIC of the mixtures with 1, 2, ... components (on the fitted particles; lower is better).
        n_states: the number of components with the lowest BIC.
        trajectories: (zdim, steps, zdim) latents along each PC, at `percentiles`.
        percentiles: (steps,) percentiles of the trajectory points.
    """

    pca: Pca
    embedding: Embedding
    labels: np.ndarray
    center_indices: np.ndarray
    k_from: str
    gmm_labels: np.ndarray
    bic: list[float]
    n_states: int
    trajectories: np.ndarray
    percentiles: np.ndarray


def analyze_latents(
    latents: np.ndarray, k: int | None = None, max_states: int = 8, seed: int = 0, max_embedding_points: int = 20_000
) -> LatentAnalysis:
    """PCA, embedding, mixture by BIC and k-means (k defaults to the mixture's number of states) of (N, zdim)."""
    if k is not None:
        check_cluster_count(k, len(latents))
    pca = fit_pca(latents)
    gmm_labels, bic, n_states = gaussian_mixture_by_bic(latents, max_states, seed)
    labels, means = kmeans(latents, k or n_states, seed)
    trajectories = [pc_trajectory(latents, pca, pc, TRAJECTORY_STEPS) for pc in range(1, latents.shape[1] + 1)]
    return LatentAnalysis(
        pca=pca, embedding=embed_2d(latents, seed, max_embedding_points), labels=labels,
        center_indices=nearest_particles(latents, means), k_from="--k" if k else "gmm n_states",
        gmm_labels=gmm_labels, bic=bic, n_states=n_states,
        trajectories=np.stack([points for points, _ in trajectories]), percentiles=trajectories[0][1],
    )


def analyze_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    k: int | None = None,
    max_states: int = 8,
    seed: int = 0,
    max_embedding_points: int = 20_000,
) -> Path:
    """Analyse the latents of a trained run and write the results to `out_dir` (default ``run_dir/analysis``).

    Writes labels.npy and gmm_labels.npy (N,) int64, centers.npy (k, zdim) float32 and center_indices.npy (k,)
    (the particles nearest the k-means centres), embedding.npy (M, 2) with embedding_indices.npy (M,),
    pca_projections.npy (N, zdim), pc_trajectories.npy (zdim, 10, zdim), one RELION 3.1 ``cluster_<i>.star`` per
    non-empty k-means cluster (rows of poses.star; null in star_files if empty), and analysis.json summarising it
    all. Returns `out_dir`.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "analysis"
    latents = load_latents(run_dir)
    poses = read_star(run_dir / "poses.star", allow_absolute_paths=True)
    if len(poses) != len(latents):
        raise InputError(run_dir / "poses.star", f"has {len(poses)} particles, latents.npy {len(latents)}")
    result = analyze_latents(latents, k, max_states, seed, max_embedding_points)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "labels": result.labels, "gmm_labels": result.gmm_labels, "centers": latents[result.center_indices],
        "center_indices": result.center_indices, "embedding": result.embedding.points.astype(np.float32),
        "embedding_indices": result.embedding.indices, "pc_trajectories": result.trajectories.astype(np.float32),
        "pca_projections": result.pca.project(latents).astype(np.float32),
    }
    for name, array in arrays.items():
        save_npy(out / f"{name}.npy", array)
    summary = {"run": str(run_dir.resolve()), "n_particles": len(latents), "zdim": latents.shape[1], "seed": seed,
               **_summary(result)}
    summary["kmeans"]["star_files"] = write_cluster_stars(out, poses, result.labels, len(result.center_indices))
    with atomic_output(out / "analysis.json") as temporary:
        temporary.write_text(json.dumps(summary, indent=1))
    return out


def _summary(result: LatentAnalysis) -> dict:
    """The analysis.json sections of a result (plain types)."""
    k, n_states, embedding = len(result.center_indices), result.n_states, result.embedding
    return {
        "pca": {"explained_variance_ratio": result.pca.explained_variance_ratio.tolist(),
                "mean": result.pca.mean.tolist(), "components": result.pca.components.tolist(),
                "projections_file": "pca_projections.npy"},
        "pc_trajectories": {"file": "pc_trajectories.npy", "axes": "(pc, step, zdim)",
                            "percentiles": result.percentiles.tolist()},
        "embedding": {"method": embedding.method, "note": embedding.note, "n_points": len(embedding.indices),
                      "file": "embedding.npy", "indices_file": "embedding_indices.npy"},
        "gmm": {"covariance": "full", "bic": result.bic, "n_states": n_states,
                "sizes": _sizes(result.gmm_labels, n_states), "labels_file": "gmm_labels.npy"},
        "kmeans": {"k": k, "k_from": result.k_from, "sizes": _sizes(result.labels, k), "labels_file": "labels.npy",
                   "centers_file": "centers.npy", "center_indices": result.center_indices.tolist()},
    }


def _sizes(labels: np.ndarray, n_clusters: int) -> list[int]:
    return np.bincount(labels, minlength=n_clusters).tolist()


def write_cluster_stars(out_dir: Path, poses: pd.DataFrame, labels: np.ndarray, n_clusters: int) -> list[str | None]:
    """``cluster_<i>.star`` per non-empty cluster i (the rows of `poses` labelled i).

    Files ``cluster_<j>.star`` left by an earlier analysis are removed, so the folder always holds one partition of
    the particles. Returns the file name of each cluster 0..n_clusters-1, None for an empty one.
    """
    sizes = np.bincount(labels, minlength=n_clusters)
    names = [f"cluster_{i}.star" if size else None for i, size in enumerate(sizes)]
    for stale in out_dir.glob("cluster_*.star"):
        if re.fullmatch(r"cluster_\d+\.star", stale.name) and stale.name not in names:
            stale.unlink()
    for i, name in enumerate(names):
        if name is not None:
            write_star(out_dir / name, poses[labels == i])
    return names
