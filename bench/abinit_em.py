"""Experiment (issue 3): classical stochastic EM + refinement (cryofire.model.em_init) as the encoder's teacher.

    python bench/abinit_em.py identifiability --star /work/bench-data/acc32/prep/train.star
    python bench/abinit_em.py em --star /work/bench-data/acc32/prep/train.star
    python bench/abinit_em.py search --star /work/bench-data/acc32/prep/train.star --search-shift-px 6
    python bench/abinit_em.py starts --star /work/bench-data/acc32/prep/train.star --starts 3 --seed 2 \
        --unblend-images 0 --save-maps maps/
    python bench/abinit_em.py pool --star /work/bench-data/acc32/prep/train.star --seed 2 --maps maps/start*.pt

``search``: both class maps rebuilt from the TRUE poses and states of all images (radius 16 px), then the global
assignment (``StochasticEM.assign``) of 2,000 images: how often the search itself misses the true pose (> 20 deg) or
class, overall and for the particles more than 3 px off-centre. ``identifiability``: a map reconstructed from the
TRUE poses of 5,000 images, low-passed to radius r, then the best pose of 400 images by global search (4,096 random
rotations x shifts, then local refinement): the median rotation error says how much pose information the images
carry up to r. ``starts``: each EM start's score and per-class explained power, and against the truth its class
agreement and rotation error. ``pool``: the class maps of saved starts pooled, each map's error on each state, and
the pairs of maps ranked by how well they explain the probe images. ``em``: the whole initialisation (stochastic EM
from random poses, assignment, refinement) on the first ``--n-images``, then its rotation error and class agreement.
Results in bench/RESULTS.md ("Ab initio by stochastic EM").

Why: an amortized encoder trained through the image loss alone did not find poses in a few hundred thousand images
(docs/method.md). Classical ab initio (cryoSPARC's SGD, RELION's initial model) compares each image with projections
in all orientations and lets it contribute to the map in proportion to how well each fits; its poses teach the
encoder.

The method itself is documented in cryofire/model/em_init.py (the ``--teacher em`` of `cryofire train`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from cryofire.device import keep_freed_memory
from cryofire.evaluate import align_poses, rotation_errors_deg
from cryofire.model.ab_initio import (
    class_explained_power,
    em_start,
    initial_poses,
    probe_rows,
    start_quality,
    swap_search,
)
from cryofire.model.em_init import EMConfig, StochasticEM
from cryofire.model.em_refine import explained_fraction, reconstruct
from cryofire.model.image_formation import HalfPlaneLattice


def load_spectra(star: str, n_images: int, radius_px: float | None = None) -> dict:
    """First ``n_images`` of a preprocessed star file: windowed spectra, CTF at the half-plane points, truth."""
    from cryofire.io import read_star
    from cryofire.model.image_formation import observed_spectrum
    from cryofire.physics import soft_circular_window
    from cryofire.train.data import ParticleImages, ctf_from_parameters

    table = read_star(star)
    data = ParticleImages(table)
    size = data.image_size
    batch = data.__getitems__(list(range(min(n_images, len(data)))))
    lattice = HalfPlaneLattice(size)
    count = lattice.count_within(size / 2 if radius_px is None else radius_px)
    window = soft_circular_window(size, 0.85, 0.99).float()  # the model's default window
    return {"size": size, "observed": observed_spectrum(batch["images"] * window, lattice, count),
            "ctf": lattice.gather(ctf_from_parameters(batch["ctf_parameters"], size), count),
            "rotations": batch["rotations"], "shifts_px": batch["origins_px"],
            "states": table["rlnClassNumber"].to_numpy()[: len(batch["index"])] - 1}


def median_error_deg(rotations: torch.Tensor, true_rotations: torch.Tensor) -> float:
    """Median rotation error (deg, after global alignment, both hands)."""
    pred, true = rotations.double().numpy(), true_rotations.double().numpy()
    return float(np.median(rotation_errors_deg(align_poses(pred, true).apply(pred), true)))


def identifiability(star: str) -> None:
    """One consensus map from the TRUE poses of 5,000 images, low-passed to r; global search of 400 images."""
    data = load_spectra(star, 5000, 14)
    for radius in (3, 4, 6, 8, 11, 14):
        em = StochasticEM(data["size"], 0, EMConfig(classes=1, end_radius_px=radius))
        count = em.lattice.count_within(radius)
        observed, ctf = data["observed"][:, :count], data["ctf"][:, :count]
        one_class = torch.zeros(len(observed), dtype=torch.long)
        reconstruct(em, observed, ctf, data["rotations"], data["shifts_px"], one_class, radius)
        rotations = em.assign(observed[:400], ctf[:400], radius, 4096, keep=1, global_radius_px=radius)[0]
        print(f"radius {radius} px ({count} points): median rotation error "
              f"{median_error_deg(rotations, data['rotations'][:400]):.1f} deg", flush=True)


def search(star: str, config: EMConfig, n_images: int = 2000) -> None:
    """Global assignment of ``n_images`` against class maps rebuilt from the true poses and states (radius 16 px)."""
    data = load_spectra(star, 10_000)
    states = torch.from_numpy(data["states"])
    em = StochasticEM(data["size"], 0, config)
    reconstruct(em, data["observed"], data["ctf"], data["rotations"].float(), data["shifts_px"].float(), states, 16)
    started = time.time()
    parts = [em.assign(data["observed"][part], data["ctf"][part], 16) for part in torch.arange(n_images).split(250)]
    rotations, _, classes, _ = (torch.cat(values) for values in zip(*parts))
    errors = rotation_errors_deg(rotations.double().numpy(), data["rotations"][:n_images].double().numpy())
    wrong = (classes != states[:n_images]).numpy()
    far = data["shifts_px"][:n_images].abs().max(-1).values.numpy() > 3.0
    print(f"search shifts up to {config.search_shift_px} px: median {np.median(errors):.2f} deg, > 20 deg "
          f"{100 * np.mean(errors > 20):.1f} % ({100 * np.mean(errors[far] > 20):.1f} % of the "
          f"{100 * far.mean():.0f} % "
          f"beyond 3 px), wrong class {100 * wrong.mean():.1f} %, {time.time() - started:.0f} s", flush=True)


def run_em(star: str, config: EMConfig, n_images: int, save: str | None = None, device: str = "cpu") -> None:
    """The whole initialisation (EM, assignment, refinement) on the first images, with the error at each stage."""
    data = load_spectra(star, n_images)
    started, stages = time.time(), {}

    def progress(stage: str, info: dict, poses: tuple | None) -> None:
        line = f"{stage} {info}"
        if poses is not None:
            rotations, shifts, classes = (value.cpu() for value in poses)
            agreement = float(np.mean(classes.numpy() == data["states"]))
            per_class = [median_error_deg(rotations[classes == k], data["rotations"][classes == k])
                         for k in range(config.classes) if (classes == k).sum() > 10]
            line += (f": median rotation error {median_error_deg(rotations, data['rotations']):.2f} deg (each class "
                     f"aligned alone: {', '.join(f'{e:.2f}' for e in per_class)}), class agreement "
                     f"{max(agreement, 1 - agreement):.4f}")
            if save:
                stages[f"{stage} {info.get('round', '')}".strip()] = {"rotations": rotations, "shifts": shifts,
                                                                      "classes": classes}
                torch.save(stages, save)
        print(f"{line}, {time.time() - started:.0f} s", flush=True)

    initial_poses(data["observed"].to(device), data["ctf"].to(device), data["size"], config, device, progress)


def compare_starts(star: str, config: EMConfig, n_images: int, first: int = 1, device: str = "cpu",
                   save_maps: str | None = None) -> None:
    """Each EM start from number ``first`` on alone (as :func:`~cryofire.model.ab_initio.best_em_start` runs them;
    the probe depends on the seed only) on the first images: its score (explained power, un-blending gain), and from
    the same assignment of the probe each class's explained power, and against the truth the class agreement and
    each class's median rotation error. With ``save_maps`` (a folder) each start's class maps are saved there as
    ``start<N>.pt`` for :func:`pool_maps`."""
    data = load_spectra(star, n_images)
    observed, ctf = data["observed"].to(device), data["ctf"].to(device)
    probe = probe_rows(len(observed), config)
    states = data["states"][probe.numpy()]
    for start in range(first - 1, config.starts):
        started = time.time()
        em = em_start(observed, ctf, data["size"], config, start, device)
        if save_maps:
            torch.save(em.volume_ft.cpu(), f"{save_maps}/start{start + 1}.pt")
        assignment = em.assign(observed[probe], ctf[probe], config.end_radius_px)
        explained, gain = start_quality(em, observed[probe], ctf[probe], assignment)
        rotations, _, classes, scores = assignment
        per_class = class_explained_power(em, observed[probe], scores, classes).tolist()
        classes, rotations = classes.cpu().numpy(), rotations.cpu()
        agreement = float(np.mean(classes == states))
        errors = [median_error_deg(rotations[classes == k], data["rotations"][probe][classes == k])
                  for k in range(config.classes) if (classes == k).sum() > 10]
        print(f"start {start + 1}: explained {explained:.4f}, unblend gain {gain:.4f}, per class "
              f"{', '.join(f'{v:.4f}' for v in per_class)} (sizes {np.bincount(classes, minlength=config.classes)}), "
              f"class agreement {max(agreement, 1 - agreement):.4f}, median error per class "
              f"{', '.join(f'{e:.1f}' for e in errors)} deg, {time.time() - started:.0f} s", flush=True)


def pool_maps(star: str, config: EMConfig, n_images: int, maps: list[str], device: str = "cpu") -> None:
    """The class maps of several EM starts (files of ``starts --save-maps``) pooled: each probe image's best pose in
    every map, then against the truth each map's median error on each state's images (aligned alone), and the pairs
    of maps (from any starts) ranked by the mean over the probe of each image's better explained fraction, with
    each pair's per-state errors: would choosing two class maps across starts pick the right map of each state?
    Also the maps the package's :func:`~cryofire.model.ab_initio.swap_search` picks from the best-explaining start's
    own (the package starts from the best by explained power plus un-blending gain)."""
    data = load_spectra(star, n_images)
    probe = probe_rows(len(data["observed"]), config)
    observed, ctf = data["observed"][probe].to(device), data["ctf"][probe].to(device)
    states, truth = data["states"][probe.numpy()], data["rotations"][probe]
    loaded = [torch.load(path) for path in maps]  # (K, G, G, G) each
    volumes = torch.cat(loaded).to(device)
    em = StochasticEM(data["size"], len(observed), dataclasses.replace(config, classes=len(volumes)), device)
    em.volume_ft = volumes
    parts = [em.assign_each_class(observed[part], ctf[part], config.end_radius_px)
             for part in torch.arange(len(observed)).split(250)]
    rotations, _, scores = (torch.cat(values).cpu() for values in zip(*parts))  # (P, K, 3, 3), _, (P, K)
    count = em.lattice.count_within(config.end_radius_px)
    explained = explained_fraction(scores, observed[:, None, :count].cpu())  # (P, K)
    names = [f"{Path(path).stem}/{k}" for path, start in zip(maps, loaded) for k in range(len(start))]
    errors = np.array([[median_error_deg(rotations[states == s, k], truth[states == s]) for s in (0, 1)]
                       for k in range(len(names))])
    for name, error, power in zip(names, errors, explained.mean(0)):
        print(f"map {name}: explained {power:.4f} (all probe images), error on state 1 / 2 images "
              f"{error[0]:.1f} / {error[1]:.1f} deg")
    pairs = []
    for i, j in itertools.combinations(range(len(names)), 2):
        better = torch.stack((explained[:, i], explained[:, j]), 1)
        picked = better.argmax(1).numpy()
        agreement = float(np.mean(picked == states))
        pairs.append((float(better.max(1).values.mean()), names[i], names[j], max(agreement, 1 - agreement),
                      errors[i], errors[j]))
    own = [[names.index(f"{Path(path).stem}/{k}") for k in range(len(start))] for path, start in zip(maps, loaded)]
    best = max(own, key=lambda columns: float(explained[:, columns].max(1).values.mean()))
    print(f"swap search from {[names[c] for c in best]}: {[names[c] for c in swap_search(explained, best)]}")
    for power, first, second, agreement, error_i, error_j in sorted(pairs, reverse=True)[:10]:
        print(f"pair {first} + {second}: explained {power:.4f}, class agreement {agreement:.3f}, errors (state 1 / 2) "
              f"{error_i[0]:.1f} / {error_i[1]:.1f} and {error_j[0]:.1f} / {error_j[1]:.1f} deg")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("identifiability", "search", "em", "starts", "pool"))
    parser.add_argument("--star", required=True, help="preprocessed particles with true poses (simulated)")
    parser.add_argument("--n-images", type=int, default=10_000)
    parser.add_argument("--save", help="em: the poses and classes after each stage (torch.save of a dict by stage)")
    parser.add_argument("--first-start", type=int, default=1, help="starts: the first start to run (1-based)")
    parser.add_argument("--save-maps", help="starts: a folder to save each start's class maps in")
    parser.add_argument("--maps", nargs="+", help="pool: class-map files saved by starts --save-maps")
    parser.add_argument("--device", default="cpu", help="em: where the EM runs (cpu, cuda)")
    for field in dataclasses.fields(EMConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args()
    keep_freed_memory()  # as the `cryofire` command line does
    config = EMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EMConfig)})
    if args.what == "identifiability":
        identifiability(args.star)
    elif args.what == "search":
        search(args.star, config)
    elif args.what == "starts":
        compare_starts(args.star, config, args.n_images, args.first_start, args.device, args.save_maps)
    elif args.what == "pool":
        pool_maps(args.star, config, args.n_images, args.maps, args.device)
    else:
        run_em(args.star, config, args.n_images, args.save, args.device)


if __name__ == "__main__":
    main()
