"""Latent analysis: clusters and mixtures recover known blobs, outputs partition the particles, edge cases hold."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from cryofire.analysis import analyze_latents, analyze_run, fit_pca, pc_trajectory
from cryofire.analysis.latents import embed_2d, write_cluster_stars
from cryofire.cli import main
from cryofire.errors import ConfigError, CryofireError, InputError
from cryofire.io import read_star, write_star


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded BLAS/OpenMP: on these tiny arrays extra threads only spin (10x slower on a busy 2-core box)."""
    with threadpool_limits(limits=1):
        yield


def two_blobs(sizes=(120, 80), zdim=3, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Latents (N, zdim) float32 of two well-separated isotropic Gaussian blobs, and the blob of each (N,)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    centres = np.zeros((len(sizes), zdim))
    centres[1, 0] = 4.0
    latents = centres[truth] + 0.3 * rng.standard_normal((len(truth), zdim))
    order = rng.permutation(len(truth))  # interleave the blobs, as particles would be
    return latents[order].astype(np.float32), truth[order]


def fake_run(folder, latents: np.ndarray):
    """A run folder with latents.npy and a poses.star of len(latents) particles (the stacks need not exist)."""
    folder.mkdir()
    n = len(latents)
    table = pd.DataFrame({
        "image_path": str(folder / "stack.mrcs"), "image_index": np.arange(n), "rlnOpticsGroup": 1,
        "rlnImagePixelSize": 2.0, "rlnImageSize": 16, "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
        "rlnAmplitudeContrast": 0.1, "rlnDefocusU": 1e4, "rlnDefocusV": 1e4, "rlnDefocusAngle": 0.0,
        "rlnAngleRot": 0.0, "rlnAngleTilt": 0.0, "rlnAnglePsi": 0.0,
    })
    write_star(folder / "poses.star", table)
    np.save(folder / "latents.npy", latents)
    return folder


def test_kmeans_and_mixture_recover_two_blobs():
    latents, truth = two_blobs()
    result = analyze_latents(latents)
    assert result.n_states == 2 and int(np.argmin(result.bic)) == 1 and len(result.bic) == 8
    assert result.k_from == "gmm n_states"
    # cluster 0 is the larger blob (120 particles), so labels equal the truth exactly
    assert np.array_equal(result.labels, truth) and np.array_equal(result.gmm_labels, truth)
    assert result.embedding.method == "tsne" and result.embedding.points.shape == (200, 2)
    assert np.isfinite(result.embedding.points).all()


def test_centers_are_the_particles_nearest_the_cluster_means():
    latents, _ = two_blobs(zdim=2)
    result = analyze_latents(latents, k=3)
    for cluster, index in enumerate(result.center_indices):
        mean = latents[result.labels == cluster].mean(axis=0)  # a k-means centre is its cluster's mean
        distances = np.linalg.norm(latents - mean, axis=1)
        assert index == np.argmin(distances) and result.labels[index] == cluster
    assert np.bincount(result.labels).tolist() == sorted(np.bincount(result.labels), reverse=True)


def test_pca_explained_variance_and_trajectory():
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    latents = (rng.standard_normal((5000, 3)) * [3.0, 1.0, 0.1]) @ rotation.T + [1.0, -2.0, 0.5]
    pca = fit_pca(latents)
    assert np.allclose(pca.explained_variance_ratio, np.array([9.0, 1.0, 0.01]) / 10.01, atol=0.01)
    assert abs(abs(pca.components[0] @ rotation[:, 0]) - 1) < 1e-3
    points, percentiles = pc_trajectory(latents, pca, 1, 5)
    assert np.allclose(percentiles, [5, 27.5, 50, 72.5, 95])
    along = (points - pca.mean) @ pca.components[0]
    assert np.allclose(points, pca.mean + along[:, None] * pca.components[0])  # on the PC1 line through the mean
    assert np.allclose(along, np.percentile(pca.project(latents)[:, 0], percentiles))
    with pytest.raises(ConfigError, match="--pc 4"):
        pc_trajectory(latents, pca, 4, 5)


def test_one_dimensional_latent_is_its_own_embedding():
    latents, truth = two_blobs(zdim=1)
    result = analyze_latents(latents, max_states=4)
    assert result.embedding.method == "latent"
    assert np.array_equal(result.embedding.points[:, 0], latents[:, 0]) and not result.embedding.points[:, 1].any()
    assert np.allclose(result.pca.explained_variance_ratio, [1.0])
    assert result.n_states == 2 and np.array_equal(result.labels, truth)


def test_tsne_runs_on_a_seeded_subset_and_tiny_sets_fall_back_to_pca():
    latents, _ = two_blobs()
    first, second = embed_2d(latents, seed=4, max_embedding_points=60), embed_2d(latents, 4, 60)
    assert len(first.indices) == 60 and np.all(np.diff(first.indices) > 0)
    assert np.array_equal(first.indices, second.indices) and "60 of 200" in first.note
    tiny = embed_2d(latents[:20], seed=0)
    assert tiny.method == "pca" and np.allclose(np.abs(tiny.points), np.abs(fit_pca(latents[:20]).project(
        latents[:20])[:, :2]))


def test_umap_is_used_when_importable(monkeypatch):
    fake = types.ModuleType("umap")
    fake.__spec__ = importlib.machinery.ModuleSpec("umap", None)
    fake.UMAP = lambda n_components, random_state: types.SimpleNamespace(fit_transform=lambda x: x[:, :2] * 2)
    monkeypatch.setitem(sys.modules, "umap", fake)
    latents, _ = two_blobs()
    embedding = embed_2d(latents, seed=0, max_embedding_points=10)
    assert embedding.method == "umap" and len(embedding.indices) == 200
    assert np.array_equal(embedding.points, latents[:, :2] * 2)


def test_analyze_run_writes_cluster_stars_that_partition_the_particles(tmp_path):
    latents, truth = two_blobs(zdim=2)
    run = fake_run(tmp_path / "run", latents)
    assert main(["analyze", str(run), "--k", "3", "--max-states", "3"]) == 0
    assert (run / "analysis" / "cluster_2.star").exists()
    out = analyze_run(run, max_states=3)  # k from the mixture: 2; the third star file must go
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["kmeans"]["star_files"] == ["cluster_0.star", "cluster_1.star"]
    assert sorted(p.name for p in out.glob("cluster_*.star")) == summary["kmeans"]["star_files"]
    stars = [read_star(out / name, allow_absolute_paths=True) for name in summary["kmeans"]["star_files"]]
    names = [star["rlnImageName"] for star in stars]
    assert [len(n) for n in names] == summary["kmeans"]["sizes"] == [120, 80]
    poses = read_star(run / "poses.star")
    labels = np.load(out / "labels.npy")
    assert np.array_equal(labels, truth)
    for cluster, cluster_names in enumerate(names):  # each file holds exactly its cluster's particles, in order
        expected = poses["image_index"][labels == cluster] + 1
        assert [int(name.split("@")[0]) for name in cluster_names] == expected.tolist()
    centers, indices = np.load(out / "centers.npy"), np.load(out / "center_indices.npy")
    assert centers.shape == (2, 2) and np.array_equal(centers, latents[indices])
    assert np.load(out / "pc_trajectories.npy").shape == (2, 10, 2)
    assert summary["embedding"]["method"] == "latent" and summary["gmm"]["n_states"] == 2


def test_empty_clusters_get_no_star_file(tmp_path):
    latents, _ = two_blobs(sizes=(3, 2), zdim=2)
    run = fake_run(tmp_path / "run", latents)
    poses = read_star(run / "poses.star")
    (tmp_path / "cluster_1.star").write_text("stale")
    names = write_cluster_stars(tmp_path, poses, np.array([0, 2, 0, 2, 2]), 3)
    assert names == ["cluster_0.star", None, "cluster_2.star"]
    assert sorted(p.name for p in tmp_path.glob("cluster_*.star")) == ["cluster_0.star", "cluster_2.star"]
    assert read_star(tmp_path / "cluster_2.star", allow_absolute_paths=True)["image_index"].tolist() == [1, 3, 4]


def test_unusable_runs_and_options_raise_clear_errors(tmp_path):
    latents, _ = two_blobs()
    with pytest.raises(CryofireError, match="homogeneous"):
        analyze_run(fake_run(tmp_path / "homogeneous", np.zeros((10, 0), np.float32)))
    with pytest.raises(InputError, match="has 200 particles, latents.npy 5"):
        run = fake_run(tmp_path / "mismatch", latents)
        np.save(run / "latents.npy", latents[:5])
        analyze_run(run)
    with pytest.raises(ConfigError, match="--k 500"):
        analyze_latents(latents, k=500)
    with pytest.raises(InputError, match="latents.npy: not found"):
        analyze_run(tmp_path)
